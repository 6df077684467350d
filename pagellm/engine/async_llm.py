"""AsyncLLM: the asyncio front end over the engine core.

Threads and ownership:

    event loop thread                       engine thread
    -----------------                       -------------
    InputProcessor (tokenize, validate)     EngineCore (scheduler + model runner)
    OutputProcessor (detokenize, stops)       loops: drain inbox -> step() -> post outputs
    one RequestOutputCollector per request
           |  inbox: ("add", requests) / ("abort", ids)  ^
           +---------------------------------------------+
           ^  loop.call_soon_threadsafe(_handle, outputs, stats)
           +---------------------------------------------+

The model loop never runs on the event loop, and the event loop never touches the
scheduler: the only shared objects are the inbox queue and the posted outputs. A
request aborted from the event loop (client gone, stop string) reaches the engine
before its next step, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncGenerator
from typing import Any, Protocol

from pagellm.config import EngineConfig
from pagellm.core.request import Request
from pagellm.core.sched_output import EngineCoreOutput
from pagellm.engine.arg_utils import EngineArgs
from pagellm.engine.input_processor import InputProcessor, PromptType
from pagellm.engine.llm_engine import EngineCore, register_request
from pagellm.engine.output_processor import OutputProcessor
from pagellm.engine.tokenizer import load_tokenizer
from pagellm.metrics.stats import IterationStats, SchedulerStats
from pagellm.outputs import CompletionOutput, RequestOutput
from pagellm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

_STOP = object()


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can be served any more."""


class QueueFullError(RuntimeError):
    """More requests are waiting than --max-queued-requests allows."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(
            f"the server is busy: {queued} requests are already waiting (limit {limit}); retry later"
        )
        self.retry_after = 1


class StatLogger(Protocol):
    def record(
        self, iteration: IterationStats | None, scheduler: SchedulerStats | None
    ) -> None: ...


def _merge_delta(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """Fold a newer DELTA output into one the consumer has not taken yet."""
    by_index: dict[int, CompletionOutput] = {c.index: c for c in old.outputs}
    for c in new.outputs:
        prev = by_index.get(c.index)
        if prev is None:
            by_index[c.index] = c
            continue
        prev.text += c.text
        prev.token_ids = list(prev.token_ids) + list(c.token_ids)
        if c.logprobs is not None:
            prev.logprobs = (prev.logprobs or []) + c.logprobs
        prev.cumulative_logprob = c.cumulative_logprob
        prev.finish_reason = c.finish_reason
        prev.stop_reason = c.stop_reason
    new.outputs = [by_index[i] for i in sorted(by_index)]
    if old.prompt_logprobs is not None and new.prompt_logprobs is None:
        new.prompt_logprobs = old.prompt_logprobs
    return new


class RequestOutputCollector:
    """One request's output stream. Holds at most one pending output: a DELTA that the
    consumer has not taken yet absorbs the next one, so a slow client costs memory for
    its unread text only, and never stalls the engine (backpressure by coalescing)."""

    def __init__(self, kind: RequestOutputKind) -> None:
        self.kind = kind
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, out: RequestOutput) -> None:
        if self._pending is not None and self.kind == RequestOutputKind.DELTA:
            out = _merge_delta(self._pending, out)
        self._pending = out
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    async def get(self) -> RequestOutput:
        await self._ready.wait()
        if self._error is not None:
            raise self._error
        out, self._pending = self._pending, None
        self._ready.clear()
        assert out is not None
        return out


class AsyncLLM:
    def __init__(
        self,
        config: EngineConfig,
        max_queued_requests: int | None = None,
        stat_loggers: list[StatLogger] | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.model.tokenizer, config.model.chat_template)
        self.input_processor = InputProcessor(config.model, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.core = EngineCore(config)
        self.max_queued_requests = max_queued_requests
        self.stat_loggers: list[StatLogger] = list(stat_loggers or [])
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._collectors: dict[str, RequestOutputCollector] = {}
        self._children: dict[str, list[str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        # Queue depth without locks: each counter has one writer (the loop thread
        # writes _submitted, the engine thread _drained and _core_waiting).
        self._submitted = 0
        self._drained = 0
        self._core_waiting = 0
        self.last_stats = SchedulerStats()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, **kwargs: Any) -> AsyncLLM:
        return cls(args.create_engine_config(), **kwargs)

    # ---- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume outputs."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run_engine, name="pagellm-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._inbox.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._dead is None

    @property
    def errored(self) -> bool:
        return self._dead is not None

    def num_queued(self) -> int:
        """Requests accepted but not yet scheduled: in the inbox or the scheduler's queue."""
        return (self._submitted - self._drained) + self._core_waiting

    def num_unfinished(self) -> int:
        return len(self._collectors)

    # ---- requests -------------------------------------------------------------------

    async def generate(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str,
        add_special_tokens: bool = True,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream the request's outputs; closing the generator early aborts the request."""
        if self._dead is not None:
            raise EngineDeadError("the engine has stopped after an error") from self._dead
        if self._thread is None:
            self.start()
        limit = self.max_queued_requests
        if limit is not None and self.num_queued() >= limit:
            raise QueueFullError(self.num_queued(), limit)
        if request_id in self._collectors:
            raise ValueError(f"request id {request_id!r} is already in use")
        root = register_request(
            self.input_processor, self.output_processor, self._children,
            request_id, prompt, params, None, add_special_tokens,
        )  # fmt: skip
        collector = RequestOutputCollector(params.output_kind)
        self._collectors[request_id] = collector
        self._submit([root])
        finished = False
        try:
            while not finished:
                out = await collector.get()
                finished = out.finished
                yield out
        finally:
            self._collectors.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def _submit(self, requests: list[Request]) -> None:
        self._submitted += len(requests)
        self._inbox.put(("add", requests))

    def abort(self, request_id: str) -> None:
        """Stop a request (all its n children); its blocks are freed before the next step."""
        ids = self._children.pop(request_id, [request_id])
        self._inbox.put(("abort", ids))
        stats = IterationStats()
        self.output_processor.abort_requests(ids, stats)
        self._record(stats, None)

    # ---- the engine thread ----------------------------------------------------------

    def _run_engine(self) -> None:
        core = self.core
        loop = self._loop
        assert loop is not None
        try:
            while True:
                idle = not core.has_unfinished_requests()
                try:
                    cmd = self._inbox.get(block=idle)
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    if cmd is _STOP:
                        return
                    kind, payload = cmd
                    if kind == "add":
                        for request in payload:
                            core.add_request(request)
                        self._core_waiting = core.scheduler.num_waiting
                        self._drained += len(payload)
                    else:
                        core.abort_requests(payload)
                    try:
                        cmd = self._inbox.get_nowait()
                    except queue.Empty:
                        cmd = None
                if not core.has_unfinished_requests():
                    loop.call_soon_threadsafe(self._handle, [], core.stats())
                    continue
                outputs = core.step()
                stats = core.stats()
                self._core_waiting = stats.num_waiting
                loop.call_soon_threadsafe(self._handle, outputs, stats)
        except BaseException as e:  # a bug must not leave clients hanging
            logger.exception("the engine loop failed")
            self._dead = e
            loop.call_soon_threadsafe(self._fail_all, e)

    # ---- back on the event loop -----------------------------------------------------

    def _handle(self, core_outputs: list[EngineCoreOutput], sched: SchedulerStats) -> None:
        self.last_stats = sched
        stats = IterationStats()
        outputs, to_abort = self.output_processor.process_outputs(core_outputs, stats=stats)
        if to_abort:
            self._inbox.put(("abort", to_abort))
        for out in outputs:
            collector = self._collectors.get(out.request_id)
            if collector is not None:
                collector.put(out)
            if out.finished:
                self._children.pop(out.request_id, None)
        self._record(stats, sched)

    def _record(self, stats: IterationStats | None, sched: SchedulerStats | None) -> None:
        for stat_logger in self.stat_loggers:
            try:
                stat_logger.record(stats, sched)
            except Exception:
                logger.exception("stat logger failed")

    def _fail_all(self, error: BaseException) -> None:
        dead = EngineDeadError("the engine has stopped after an error")
        dead.__cause__ = error
        for collector in self._collectors.values():
            collector.fail(dead)
