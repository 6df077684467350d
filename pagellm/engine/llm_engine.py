"""The synchronous engine.

``EngineCore`` is the model loop: scheduler + model runner, token ids in and out, no
text. ``LLMEngine`` wraps it with the input processor (tokenize, validate) and the
output processor (detokenize, stop strings, RequestOutput). The asyncio front end
(``async_llm.AsyncLLM``) reuses the input and output processors with the core in its own
process (``core_client.py``).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pagellm.config import EngineConfig
from pagellm.core.request import Request, RequestStatus
from pagellm.core.sched_output import EngineCoreOutput
from pagellm.core.scheduler import Scheduler
from pagellm.core.structured_output import StructuredOutputManager
from pagellm.engine.arg_utils import EngineArgs
from pagellm.engine.beam_search import BeamSearchGroup, candidates_per_beam
from pagellm.engine.input_processor import InputProcessor, PromptType
from pagellm.engine.output_processor import OutputProcessor, ParentRequest
from pagellm.engine.tokenizer import load_tokenizer
from pagellm.executor import Executor, UniExecutor, WorkerFailedError
from pagellm.lora.request import LoRARequest
from pagellm.metrics.stats import SchedulerStats
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams
from pagellm.worker.kv_cache import KVCachePlan
from pagellm.worker.model_runner import ModelRunner
from pagellm.worker.sleep import check_sleep_level, check_wake_tags

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


_GROUP_USAGE_PERIOD = 0.5
"""Seconds between two counts of the KV blocks per cache group (the dashboard polls 1/s)."""


class EngineCore:
    """Scheduler + model runner. Not thread-safe: one thread drives it."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.executor = Executor.create(config)
        try:
            self.plan: KVCachePlan = self.executor.initialize_kv_cache()
        except BaseException:
            self.executor.shutdown()
            raise
        mc = config.model
        self.structured = StructuredOutputManager(
            lambda: load_tokenizer(mc.tokenizer, mc.chat_template),
            int(mc.hf_config.vocab_size),
            mc.eos_token_ids,
            config.structured_outputs.backend,
        )
        self.scheduler = Scheduler(
            config.scheduler, config.cache, self.plan.num_blocks, self.structured,
            max_loras=config.lora.max_loras if config.lora is not None else 0,
            speculative=config.speculative, kv_group_windows=self.plan.layout.windows,
            num_tier_slots=self.plan.num_tier_slots,
        )  # fmt: skip
        tier = self.scheduler.kv.tier
        if tier is not None and config.cache.kv_offload_dir:
            # A persistent tier: the blocks every worker found intact in its file.
            found = self.executor.collective_rpc("kv_tier_entries")
            common = set.intersection(*(set(f) for f in found)) if found else set()
            logger.info(
                "KV tier in %s: %d blocks kept from before", config.cache.kv_offload_dir,
                tier.restore(sorted(common)),
            )  # fmt: skip
        self.beam_groups: dict[str, BeamSearchGroup] = {}
        self._lora_to_remove: set[int] = set()
        self.last_step: StepStats | None = None
        # Per-group KV usage walks every request's blocks (models with several groups):
        # refreshed at most every _GROUP_USAGE_PERIOD s, not on every step's stats.
        self._group_usage: tuple[float, ...] = ()
        self._group_usage_at = -_GROUP_USAGE_PERIOD
        self.asleep: set[str] = set()
        """What sleep mode has freed ("weights", "kv_cache"); empty: awake."""
        # Everything built so far (the model's modules and tensors, the tokenizer) lives as
        # long as the engine: move it out of the collector's reach, so that the young
        # objects of each step do not make Python rescan the whole model (a tenth of a
        # decode step's time on a small model before this).
        gc.collect()
        gc.freeze()

    @property
    def runner(self) -> ModelRunner:
        """The model runner, when it lives in this process (the uni executor)."""
        if not isinstance(self.executor, UniExecutor):
            raise AttributeError(
                f"the model runs in {self.executor.world_size} worker processes "
                f"({self.config.parallel.distributed_executor_backend} executor)"
            )
        return self.executor.worker.runner

    def shutdown(self) -> None:
        self.executor.shutdown()

    def check_health(self) -> None:
        """Raise WorkerFailedError when a worker is gone."""
        self.executor.check_health()

    def add_request(self, request: Request) -> None:
        if self.asleep:
            # The front ends refuse requests while asleep; one that slips through ends
            # (aborted) instead of running on freed tensors.
            logger.warning("request %s arrived while the engine sleeps: aborted", request.req_id)
            self.scheduler.fail_request(request)
            return
        lora = request.lora_request
        if lora is not None and self.executor.lora_enabled:
            # Read the adapter now: if its files went away after the front end checked
            # them, only this request fails (not a step, not the engine).
            try:
                self.executor.load_lora(lora)
            except WorkerFailedError:
                raise
            except Exception as e:
                logger.error("LoRA adapter %s (%s) cannot be loaded, request %s is aborted: %s",
                             lora.lora_name, lora.lora_path, request.req_id, e)  # fmt: skip
                self.scheduler.fail_request(request)
                return
        self.scheduler.add_request(request)
        if request.sampling_params.use_beam_search:
            self.beam_groups[request.req_id] = BeamSearchGroup.start(request)

    def remove_lora(self, lora_id: int) -> None:
        """Drop an adapter's weights now, or once the requests still using it end."""
        self._lora_to_remove.add(lora_id)
        self._remove_unused_loras()

    def _remove_unused_loras(self) -> None:
        if not self._lora_to_remove:
            return
        in_use = {r.lora_id for r in self.scheduler.requests.values()}
        for lora_id in sorted(self._lora_to_remove - in_use):
            self.executor.remove_lora(lora_id)
            self._lora_to_remove.discard(lora_id)

    # ---- sleep mode -----------------------------------------------------------------

    @property
    def is_sleeping(self) -> bool:
        return bool(self.asleep)

    def sleep(self, level: int = 1) -> dict[str, Any]:
        """Free the KV cache on every worker (level 1; on GPU the weights also move to
        host memory) or the KV cache and the weights (level 2). Only when idle (the front
        ends stop admitting and let the requests in flight finish first): RuntimeError
        otherwise. The prefix cache is reset, since the blocks' contents are gone; the
        scheduler keeps its blocks, so the same ids address the tensors wake_up makes."""
        level = check_sleep_level(level)
        if self.has_unfinished_requests():
            s = self.scheduler
            raise RuntimeError(
                f"cannot sleep with requests in flight ({s.num_running} running, "
                f"{s.num_waiting} waiting): let them finish or abort them first"
            )
        if not self.scheduler.kv.reset_prefix_cache():
            raise RuntimeError("cannot sleep: KV blocks are still in use")
        # The model was frozen out of the collector's reach at start-up (see __init__):
        # let it go now, in case a cycle holds what the workers drop.
        gc.unfreeze()
        self.asleep |= {"kv_cache", "weights"}  # until the workers say what they freed
        workers = self.executor.sleep(level)
        self.asleep = {t for w in workers for t in w["asleep"]}
        plan = self.plan
        return {
            "level": level,
            "asleep": sorted(self.asleep),
            "num_blocks": plan.num_blocks,  # what wake_up allocates again
            "kv_bytes_per_token": plan.kv_bytes_per_token,
            "workers": workers,
        }

    def wake_up(self, tags: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
        """Restore what ``tags`` names ("weights", "kv_cache"; none: both) on every
        worker; serving resumes once nothing is asleep. A failure (the checkpoint gone)
        raises and leaves the engine asleep: wake_up again once it is fixed."""
        woken = check_wake_tags(tags)
        workers = self.executor.wake_up(list(woken))
        self.asleep = {t for w in workers for t in w["asleep"]}
        if not self.asleep:
            gc.collect()
            gc.freeze()  # as at start-up
        return {"asleep": sorted(self.asleep), "workers": workers}

    def abort_requests(self, req_ids: Iterable[str]) -> None:
        plain = []
        for req_id in req_ids:
            group = self.beam_groups.pop(req_id, None)
            if group is not None:
                group.abort(self.scheduler)
            else:
                plain.append(req_id)
        self.scheduler.finish_requests(plain, RequestStatus.FINISHED_ABORTED)

    def _advance_beam_groups(self, outputs: list[EngineCoreOutput]) -> list[EngineCoreOutput]:
        """Hand beam candidates to their groups; return the other outputs plus finished searches."""
        owner = {b: g for g in self.beam_groups.values() for b in g.beams}
        kept = []
        for out in outputs:
            group = owner.get(out.req_id)
            if group is None:
                kept.append(out)
            elif out.new_logprobs:
                group.pending[out.req_id] = out.new_logprobs[0]
        for root_id, group in list(self.beam_groups.items()):
            if group.ready():
                final = group.advance(self.scheduler)
                if final is not None:
                    kept.append(final)
                    del self.beam_groups[root_id]
        return kept

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> SchedulerStats:
        s = self.scheduler
        now = time.monotonic()
        if now - self._group_usage_at >= _GROUP_USAGE_PERIOD:
            self._group_usage, self._group_usage_at = s.kv.group_usage(), now
        prefix = s.kv.prefix_stats
        tier = s.kv.tier
        return SchedulerStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_tier_blocks_out=tier.num_stored if tier else 0,
            kv_tier_blocks_in=tier.num_loaded if tier else 0,
            kv_tier_bytes_per_block=self.plan.kv_bytes_per_token * self.plan.block_size,
            prefix_cache_tier_hits=tier.num_loaded * s.block_size if tier else 0,
            num_swapped_in=s.num_swapped_in,
            num_running_tokens=sum(r.num_tokens for r in s.running),
            num_waiting_tokens=sum(r.num_tokens for r in s.waiting),
            kv_cache_usage=s.kv_cache_usage,
            kv_cache_group_usage=self._group_usage,
            prefix_cache_queries=prefix.queries,
            prefix_cache_hits=prefix.hits,
            num_preemptions=s.num_preemptions,
            running_loras=_lora_names(s.running) if self.config.lora is not None else (),
            waiting_loras=_lora_names(s.waiting) if self.config.lora is not None else (),
            spec_num_drafts=s.spec_num_drafts,
            spec_num_draft_tokens=s.spec_num_draft_tokens,
            spec_num_accepted_tokens=s.spec_num_accepted_tokens,
        )

    def take_kv_events(self) -> tuple[list[bytes], list[bytes]]:
        """Block hashes cached and evicted since the last call (empty unless
        ``cache.kv_events``): the data-parallel router's view of this replica's cache."""
        return self.scheduler.kv.pool.take_events()

    def step(self) -> list[EngineCoreOutput]:
        start = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if sched.finished_req_ids or sched.block_copies or sched.kv_offloads or sched.kv_loads:
                self.executor.execute_model(sched)  # let the workers drop finished state
            return self.scheduler.take_failed()
        result = self.executor.execute_model(sched)
        outputs = self.scheduler.update_from_output(sched, result)
        if self.beam_groups:
            outputs = self._advance_beam_groups(outputs)
        self._remove_unused_loras()
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
        self.input_processor = InputProcessor(config.model, self.tokenizer, config.lora)
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
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Validate and queue a request (n > 1 becomes n child requests). With the
        priority scheduling policy, a lower ``priority`` is served first."""
        if self.core.is_sleeping:
            raise RuntimeError("the engine is sleeping: call wake_up() first")
        if req_id in self.output_processor.states or req_id in self._children:
            raise ValueError(f"request id {req_id!r} is already in use")
        root = register_request(
            self.input_processor, self.output_processor, self._children,
            req_id, prompt, params, arrival_time, add_special_tokens, priority, lora_request,
        )  # fmt: skip
        self.core.add_request(root)

    def abort_request(self, req_ids: str | Iterable[str]) -> list[RequestOutput]:
        ids = [req_ids] if isinstance(req_ids, str) else list(req_ids)
        expanded: list[str] = []
        for req_id in ids:
            expanded.extend(self._children.pop(req_id, [req_id]))
        self.core.abort_requests(expanded)
        return self.output_processor.abort_requests(expanded)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def remove_lora(self, lora_id: int) -> None:
        """Forget an adapter: its weights go once no request uses it."""
        self.input_processor.forget_lora(lora_id)
        self.core.remove_lora(lora_id)

    def sleep(self, level: int = 1) -> dict[str, Any]:
        """Free the KV cache (level 1) or the KV cache and the weights (level 2) until
        ``wake_up``; only between requests (see EngineCore.sleep)."""
        return self.core.sleep(level)

    def wake_up(self, tags: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
        return self.core.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.core.is_sleeping

    def step(self) -> list[RequestOutput]:
        core_outputs = self.core.step()
        outputs, to_abort = self.output_processor.process_outputs(core_outputs)
        if to_abort:
            self.core.abort_requests(to_abort)
        for out in outputs:
            if out.finished:
                self._children.pop(out.request_id, None)
        return outputs


def _lora_names(requests: Iterable[Request]) -> tuple[str, ...]:
    return tuple(sorted({r.lora_request.lora_name for r in requests if r.lora_request is not None}))


def register_request(
    input_processor: InputProcessor,
    output_processor: OutputProcessor,
    children: dict[str, list[str]],
    req_id: str,
    prompt: PromptType | dict[str, Any],
    params: SamplingParams,
    arrival_time: float | None,
    add_special_tokens: bool,
    priority: int = 0,
    lora_request: LoRARequest | None = None,
) -> Request:
    """Validate one user request, register its requests with the output processor (and
    its samples in ``children``), and return the one the core schedules: n > 1, best_of
    and beam search siblings fork from it."""
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ValueError(f"priority must be an integer, got {priority!r}")
    requests = make_requests(
        input_processor, req_id, prompt, params, arrival_time, add_special_tokens, lora_request
    )
    for request, _ in requests:
        request.priority = priority
    parent = ParentRequest.for_params(req_id, params)
    if parent is not None:
        children[req_id] = [r.req_id for r, _ in requests]
    for index, (request, text) in enumerate(requests):
        output_processor.add_request(request, text, parent, index)
    return requests[0][0]


def make_requests(
    processor: InputProcessor,
    req_id: str,
    prompt: PromptType | dict[str, Any],
    params: SamplingParams,
    arrival_time: float | None,
    add_special_tokens: bool,
    lora_request: LoRARequest | None = None,
) -> list[tuple[Request, str | None]]:
    """The requests behind one user request, the first holding the others as pending forks.

    n > 1 or best_of gives samples ``{i}_{req_id}`` (seed + i when seeded) that share the
    prompt's KV blocks; beam search gives one root request whose beams fork later.
    """
    now = time.time() if arrival_time is None else arrival_time
    if params.use_beam_search:
        root = params.clone()
        eos = () if root.ignore_eos else processor.model_config.eos_token_ids
        num_eos = len(set(eos) | set(root.stop_token_ids or ()))
        assert root.beam_width is not None
        root.logprobs = candidates_per_beam(root.beam_width, num_eos)  # the candidates, unreported
        root._report_logprobs = False
        return [
            processor.process(req_id, prompt, root, now, add_special_tokens, None, lora_request)
        ]
    k = params.num_samples
    if k == 1:
        return [
            processor.process(req_id, prompt, params, now, add_special_tokens, None, lora_request)
        ]
    out: list[tuple[Request, str | None]] = []
    for i in range(k):
        child = params.clone()
        child.n, child.best_of = 1, None
        if params.seed is not None:
            child.seed = params.seed + i
        if params.best_of is not None and child.logprobs is None:
            child.logprobs = 0  # best_of ranks samples by cumulative logprob
            child._report_logprobs = False
        if out:  # the siblings reuse the first sample's tokens instead of re-tokenizing
            first, text = out[0]
            prompt = {"prompt": text, "prompt_token_ids": first.prompt_token_ids,
                      "cache_salt": first.cache_salt}  # fmt: skip
        out.append(
            processor.process(
                f"{i}_{req_id}", prompt, child, now, add_special_tokens, None, lora_request
            )
        )
    out[0][0].pending_forks = [r for r, _ in out[1:]]
    return out
