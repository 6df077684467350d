"""The synchronous engine.

``EngineCore`` is the model loop: scheduler + model runner, token ids in and out, no
text. ``LLMEngine`` wraps it with the input processor (tokenize, validate) and the
output processor (detokenize, stop strings, RequestOutput). The asyncio front end
(``async_llm.AsyncLLM``) reuses the same three pieces with the core on its own thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pagellm.config import EngineConfig
from pagellm.core.request import Request, RequestStatus
from pagellm.core.sched_output import EngineCoreOutput
from pagellm.core.scheduler import Scheduler
from pagellm.engine.arg_utils import EngineArgs
from pagellm.engine.input_processor import InputProcessor, PromptType
from pagellm.engine.output_processor import OutputProcessor, ParentRequest
from pagellm.engine.tokenizer import load_tokenizer
from pagellm.metrics.stats import SchedulerStats
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams
from pagellm.worker.kv_cache import KVCachePlan
from pagellm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class StepStats:
    """What one core step did (for metrics and logs)."""

    num_scheduled_tokens: int
    num_prefill_tokens: int
    num_decode_reqs: int
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    step_time: float


class EngineCore:
    """Scheduler + model runner. Not thread-safe: one thread drives it."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        self.plan: KVCachePlan = self.runner.initialize_kv_cache()
        self.scheduler = Scheduler(config.scheduler, config.cache, self.plan.num_blocks)
        self.last_step: StepStats | None = None

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, req_ids: Iterable[str]) -> None:
        self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> SchedulerStats:
        s = self.scheduler
        prefix = s.kv.prefix_stats
        return SchedulerStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_cache_usage=s.kv_cache_usage,
            prefix_cache_queries=prefix.queries,
            prefix_cache_hits=prefix.hits,
            num_preemptions=s.num_preemptions,
        )

    def step(self) -> list[EngineCoreOutput]:
        start = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if sched.finished_req_ids or sched.block_copies:
                self.runner.execute_model(sched)  # let the worker drop finished state
            return []
        result = self.runner.execute_model(sched)
        outputs = self.scheduler.update_from_output(sched, result)
        n_decode = sum(1 for n in sched.num_scheduled_tokens.values() if n == 1)
        self.last_step = StepStats(
            num_scheduled_tokens=sched.total_num_scheduled_tokens,
            num_prefill_tokens=sched.total_num_scheduled_tokens - n_decode,
            num_decode_reqs=n_decode,
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.scheduler.kv_cache_usage,
            step_time=time.perf_counter() - start,
        )
        return outputs


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.model.tokenizer, config.model.chat_template)
        self.input_processor = InputProcessor(config.model, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.core = EngineCore(config)
        # parent request id -> child request ids (n > 1)
        self._children: dict[str, list[str]] = {}

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args.create_engine_config())

    @property
    def plan(self) -> KVCachePlan:
        return self.core.plan

    def add_request(
        self,
        req_id: str,
        prompt: PromptType | dict[str, Any],
        params: SamplingParams,
        arrival_time: float | None = None,
        add_special_tokens: bool = True,
    ) -> None:
        """Validate and queue a request (n > 1 becomes n child requests)."""
        if req_id in self.output_processor.states or req_id in self._children:
            raise ValueError(f"request id {req_id!r} is already in use")
        requests = make_requests(
            self.input_processor, req_id, prompt, params, arrival_time, add_special_tokens
        )
        parent = None
        if params.n > 1:
            parent = ParentRequest(req_id, params.n, params.output_kind)
            self._children[req_id] = [r.req_id for r, _ in requests]
        for index, (request, text) in enumerate(requests):
            self.output_processor.add_request(request, text, parent, index)
            self.core.add_request(request)

    def abort_request(self, req_ids: str | Iterable[str]) -> list[RequestOutput]:
        ids = [req_ids] if isinstance(req_ids, str) else list(req_ids)
        expanded: list[str] = []
        for req_id in ids:
            expanded.extend(self._children.pop(req_id, [req_id]))
        self.core.abort_requests(expanded)
        return self.output_processor.abort_requests(expanded)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        core_outputs = self.core.step()
        outputs, to_abort = self.output_processor.process_outputs(core_outputs)
        if to_abort:
            self.core.abort_requests(to_abort)
        for out in outputs:
            if out.finished:
                self._children.pop(out.request_id, None)
        return outputs


def make_requests(
    processor: InputProcessor,
    req_id: str,
    prompt: PromptType | dict[str, Any],
    params: SamplingParams,
    arrival_time: float | None,
    add_special_tokens: bool,
) -> list[tuple[Request, str | None]]:
    """One Request per completion: n > 1 gives children ``{i}_{req_id}`` with seed + i."""
    if params.n == 1:
        return [processor.process(req_id, prompt, params, arrival_time, add_special_tokens)]  # type: ignore[arg-type]
    out = []
    now = time.time() if arrival_time is None else arrival_time
    for i in range(params.n):
        child = params.clone()
        child.n = 1
        if params.seed is not None:
            child.seed = params.seed + i
        out.append(processor.process(f"{i}_{req_id}", prompt, child, now, add_special_tokens))  # type: ignore[arg-type]
    return out
