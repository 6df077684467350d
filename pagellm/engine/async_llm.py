"""AsyncLLM: the asyncio front end of the server; the engine core runs in its own process.

    event loop (this process)                    engine core process (core_client.py)
    -------------------------                    -------------------------------------
    InputProcessor (tokenize, validate)          EngineCore (scheduler + model runner)
    OutputProcessor (detokenize, stop strings)     drain commands -> step() -> outputs
    one RequestOutputCollector per request
           | add_request(): ("add", request) ---------------------------^
           ^ reader thread: call_soon_threadsafe(_handle, outputs, stats) |
           +-------------------------------------------------------------+

``add_request`` validates and admits a request at once (a full queue raises
QueueFullError before any response starts) and returns its stream. The model loop never
runs on the event loop, and the event loop never touches the scheduler. A request
aborted from the event loop (client gone, stop string) reaches the engine before its
next step, which frees its KV blocks. If the engine process dies every stream fails
with EngineDeadError and ``on_dead`` callbacks run (the server exits non-zero).

Data parallel (``parallel.data_parallel_size`` N > 1): N engine processes, one
``EngineCoreClient`` each, behind the same input and output processors. A router (see
pagellm.engine.router) picks each request's replica from the replicas' loads and
the KV events they report; every later command for the request (abort) goes to that
replica. A replica that dies fails only its own streams and leaves the rotation; the
engine is dead (``on_dead``) when the last one goes.

Sleep mode (vLLM's): ``sleep(level)`` stops admitting (EngineSleepingError, the server's
503), lets the requests in flight finish, then sends ("sleep", level) to every live
replica and waits for each one's ("sleep_done", report, error); ``wake_up(tags)`` does the
same with ("wake_up", tags). Requests are admitted again once no replica is asleep.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import time
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, Protocol

from pagellm.config import EngineConfig
from pagellm.core.request import Request
from pagellm.core.sched_output import EngineCoreOutput
from pagellm.engine.arg_utils import EngineArgs
from pagellm.engine.core_client import EngineCoreClient
from pagellm.engine.input_processor import InputProcessor, PromptType
from pagellm.engine.llm_engine import register_request
from pagellm.engine.output_processor import OutputProcessor
from pagellm.engine.router import Router, router_for
from pagellm.engine.tokenizer import load_tokenizer
from pagellm.lora.request import LoRARequest
from pagellm.metrics.stats import IterationStats, SchedulerStats
from pagellm.outputs import CompletionOutput, RequestOutput
from pagellm.sampling_params import RequestOutputKind, SamplingParams
from pagellm.worker.sleep import check_sleep_level, check_wake_tags

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can be served any more."""


class QueueFullError(RuntimeError):
    """More requests are waiting than --max-queued-requests allows."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(
            f"the server is busy: {queued} requests are already waiting (limit {limit}); retry later"
        )
        self.retry_after = 1


class EngineSleepingError(RuntimeError):
    """The engine is asleep (or going to sleep, or waking up): retry after wake_up."""

    def __init__(self) -> None:
        super().__init__("the engine is sleeping (POST /wake_up wakes it); retry later")
        self.retry_after = 5


class SleepModeError(RuntimeError):
    """A sleep or wake_up that an engine could not do (its reason); the engine lives on,
    asleep or awake as ``AsyncLLM.is_sleeping`` says."""


class StatLogger(Protocol):
    def record(
        self, iteration: IterationStats | None, scheduler: SchedulerStats | None, engine: int = 0
    ) -> None: ...


session_key: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pagellm_session_key", default=None
)
"""The routing session of the request being admitted (set by the API layer from a header
or the body's ``user``/``prompt_cache_key``): data-parallel replicas keep a session on the
replica that served it first."""


class Replica:
    """One engine core as the front end sees it. ``drained`` and ``core_waiting`` are
    written by its reader thread (queue depth without locks); the rest on the event loop."""

    def __init__(self, index: int, client: EngineCoreClient) -> None:
        self.index = index
        self.client = client
        self.alive = True
        self.error: str | None = None
        self.submitted = 0
        self.drained = 0
        self.core_waiting = 0
        self.last_stats = SchedulerStats()
        self.last_step_seconds = 0.0
        # (submission number, prompt tokens) of requests the core has not taken yet.
        self._unseen: deque[tuple[int, int]] = deque()
        self._unseen_tokens = 0
        self.sleeping = False
        """Asleep by the core's last sleep/wake report (weights or KV cache freed)."""
        # Sleep/wake commands sent and not yet answered, oldest first (answers come in order).
        self.pending_control: deque[asyncio.Future[tuple[dict[str, Any], str | None]]] = deque()

    @property
    def load(self) -> int:
        """Tokens in flight: what the core last reported plus what was sent since."""
        while self._unseen and self._unseen[0][0] <= self.drained:
            self._unseen_tokens -= self._unseen.popleft()[1]
        s = self.last_stats
        return s.num_running_tokens + s.num_waiting_tokens + self._unseen_tokens

    def sent(self, num_tokens: int) -> None:
        self.submitted += 1
        self._unseen.append((self.submitted, num_tokens))
        self._unseen_tokens += num_tokens

    def health(self) -> dict[str, Any]:
        s = self.last_stats
        return {
            "engine": self.index,
            "alive": self.alive,
            "pid": self.client.pid,
            "num_requests_running": s.num_running,
            "num_requests_waiting": s.num_waiting,
            "kv_cache_usage_perc": s.kv_cache_usage,
            "sleeping": self.sleeping,
            **({"error": self.error} if self.error else {}),
        }


def split_replica_cores(num_replicas: int) -> list[list[int] | None]:
    """Disjoint CPU cores for each replica (an even share of this process's), or None
    each when the cores are not known or too few to split."""
    if num_replicas == 1 or not hasattr(os, "sched_getaffinity"):
        return [None] * num_replicas
    from pagellm.worker.worker import split_cores

    available = sorted(os.sched_getaffinity(0))
    if len(available) < num_replicas:
        return [None] * num_replicas
    return list(split_cores(available, num_replicas, None))


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

    def __init__(self, kind: RequestOutputKind, lora_id: int = 0) -> None:
        self.kind = kind
        self.lora_id = lora_id  # the request's LoRA adapter (0: the base model)
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


class RequestStream:
    """The outputs of one admitted request. Iterate it; ``abort_if_unfinished`` (also run
    by ``aclose``) stops the request if nobody will read the rest."""

    def __init__(
        self, engine: AsyncLLM, request_id: str, collector: RequestOutputCollector
    ) -> None:
        self._engine = engine
        self.request_id = request_id
        self._collector = collector
        self._state = {"finished": False}
        # A stream dropped unread (its client went away before the response started) is
        # aborted when it is collected, so no request runs on for nobody.
        weakref.finalize(self, engine._abandon, request_id, self._state)

    @property
    def finished(self) -> bool:
        return self._state["finished"]

    @finished.setter
    def finished(self, value: bool) -> None:
        self._state["finished"] = value

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            out = await self._collector.get()
        except BaseException:
            self.abort_if_unfinished()
            raise
        if out.finished:
            self.finished = True
            self._engine._collectors.pop(self.request_id, None)
        return out

    def abort_if_unfinished(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine._collectors.pop(self.request_id, None)
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.abort_if_unfinished()


class AsyncLLM:
    def __init__(
        self,
        config: EngineConfig,
        max_queued_requests: int | None = None,
        stat_loggers: list[StatLogger] | None = None,
        step_timeout: float | None = None,
        router: Router | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.model.tokenizer, config.model.chat_template)
        self.input_processor = InputProcessor(config.model, self.tokenizer, config.lora)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.max_queued_requests = max_queued_requests
        self.stat_loggers: list[StatLogger] = list(stat_loggers or [])
        self.step_timeout = step_timeout
        self.on_dead: list[Callable[[str], None]] = []
        self.on_replica_dead: list[Callable[[int, str], None]] = []
        """Called with (engine index, reason) when a replica dies (the last one too)."""
        self._collectors: dict[str, RequestOutputCollector] = {}
        self._children: dict[str, list[str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead: BaseException | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.stalled = False
        self._last_progress = time.monotonic()
        self._sleep_lock = asyncio.Lock()  # one sleep or wake_up at a time
        self._going_to_sleep = False
        num = config.parallel.data_parallel_size
        # None with one replica (nothing to choose); a given one: tests, Ray Serve.
        self.router = router if router is not None else router_for(config)
        # Which replica holds each admitted request (the collectors' keys).
        self._engine_of: dict[str, int] = {}
        cores = split_replica_cores(num) if config.device.device == "cpu" else [None] * num
        clients: list[EngineCoreClient] = []
        try:
            for i in range(num):  # all replicas load their models at once
                clients.append(EngineCoreClient(config, engine_index=i, cores=cores[i], wait=False))
            for c in clients:
                c.wait_ready()
        except BaseException:
            for c in clients:
                c.shutdown(2.0)
            raise
        self.replicas = [Replica(i, c) for i, c in enumerate(clients)]
        self.client = clients[0]
        self.plan = self.client.plan

    @classmethod
    def from_engine_args(cls, args: EngineArgs, **kwargs: Any) -> AsyncLLM:
        return cls(args.create_engine_config(), **kwargs)

    # ---- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start talking to the engine; call from the event loop that consumes outputs."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        for r in self.replicas:
            r.client.start(
                functools.partial(self._on_message, r), functools.partial(self._on_dead, r)
            )
        if self.step_timeout:
            self._watchdog = self._loop.create_task(self._watch(self.step_timeout))

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for r in self.replicas:
            r.client.shutdown(timeout)

    @property
    def is_running(self) -> bool:
        return self._loop is not None and self._dead is None

    @property
    def errored(self) -> bool:
        return self._dead is not None

    def num_queued(self) -> int:
        """Requests accepted but not yet scheduled: on their way or in a scheduler's queue."""
        return sum(r.submitted - r.drained + r.core_waiting for r in self.replicas if r.alive)

    @property
    def last_stats(self) -> SchedulerStats:
        """The first live replica's latest scheduler stats."""
        return next((r.last_stats for r in self.replicas if r.alive), self.replicas[0].last_stats)

    @property
    def last_step_seconds(self) -> float:
        return max(r.last_step_seconds for r in self.replicas)

    def health(self) -> list[dict[str, Any]]:
        """Each replica: alive, pid, running/waiting requests, KV usage (and its error)."""
        return [r.health() for r in self.replicas]

    def num_unfinished(self) -> int:
        return len(self._collectors)

    @property
    def is_sleeping(self) -> bool:
        """Going to sleep, asleep, or not yet awake on every live replica: requests are
        refused with EngineSleepingError."""
        return self._going_to_sleep or any(r.sleeping for r in self.replicas if r.alive)

    # ---- requests -------------------------------------------------------------------

    def add_request(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str,
        add_special_tokens: bool = True,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> RequestStream:
        """Validate and admit a request now (ValueError, QueueFullError, EngineDeadError
        are raised here, before any response starts) and return its output stream."""
        if self._dead is not None:
            raise EngineDeadError("the engine has stopped after an error") from self._dead
        if self.is_sleeping:
            raise EngineSleepingError()
        if self._loop is None:
            self.start()
        limit = self.max_queued_requests
        if limit is not None and self.num_queued() >= limit:
            raise QueueFullError(self.num_queued(), limit)
        if request_id in self._collectors:
            raise ValueError(f"request id {request_id!r} is already in use")
        root = register_request(
            self.input_processor, self.output_processor, self._children,
            request_id, prompt, params, None, add_special_tokens, priority, lora_request,
        )  # fmt: skip
        try:
            replica = self._pick_replica(root)
        except BaseException:
            self.output_processor.abort_requests(self._children.pop(request_id, [request_id]))
            raise
        collector = RequestOutputCollector(
            params.output_kind, lora_request.lora_int_id if lora_request is not None else 0
        )
        self._collectors[request_id] = collector
        self._engine_of[request_id] = replica.index
        if not self._collectors or len(self._collectors) == 1:
            self._last_progress = time.monotonic()  # idle until now: not a stall
        replica.sent(root.num_tokens)
        replica.client.send(("add", root))
        return RequestStream(self, request_id, collector)

    def _pick_replica(self, request: Request) -> Replica:
        if self.router is None:
            return self.replicas[0]
        try:
            choice = self.router.route(
                request.prompt_token_ids, [r.load for r in self.replicas],
                cache_key=request.cache_key, lora_id=request.lora_id, session=session_key.get(),
            )  # fmt: skip
        except RuntimeError as e:
            raise EngineDeadError(str(e)) from None
        replica = self.replicas[choice.engine]
        assert replica.alive, f"the router chose dead engine {choice.engine}"
        return replica

    async def generate(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str,
        add_special_tokens: bool = True,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's outputs (admitted when iteration starts; the server uses
        add_request to refuse before responding); closing early aborts it."""
        stream = self.add_request(
            prompt, params, request_id, add_special_tokens, priority, lora_request
        )
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort_if_unfinished()

    def lora_in_use(self, lora_id: int) -> bool:
        """Whether a request for this adapter is still running."""
        return any(c.lora_id == lora_id for c in self._collectors.values())

    async def remove_lora(self, lora_id: int, poll: float = 0.05) -> None:
        """Unload an adapter: wait for its running requests to finish, then drop it."""
        while self.lora_in_use(lora_id) and self._dead is None:
            await asyncio.sleep(poll)
        self.input_processor.forget_lora(lora_id)
        for r in self.replicas:
            if r.alive:
                r.client.send(("remove_lora", lora_id))

    # ---- sleep mode -----------------------------------------------------------------

    async def sleep(self, level: int = 1, poll: float = 0.02) -> list[dict[str, Any]]:
        """Put every live replica to sleep: level 1 frees the KV cache (on GPU the weights
        move to host memory), level 2 the weights too. New requests are refused from now
        on; the requests in flight run to their end first (vLLM's ``mode=wait``). If this
        is cancelled while they run, nothing has changed and requests are admitted again.
        Returns each replica's report (pid, bytes freed, resident bytes before and after);
        SleepModeError if one could not sleep."""
        level = check_sleep_level(level)
        if self._loop is None:
            self.start()
        async with self._sleep_lock:
            self._check_alive()
            self._going_to_sleep = True
            try:
                while self._engine_of and self._dead is None:
                    await asyncio.sleep(poll)
                self._check_alive()
            except BaseException:
                self._going_to_sleep = False
                raise
            # Once sent, the command completes even if the caller goes away.
            return await asyncio.shield(self._control_all(("sleep", level)))

    async def wake_up(self, tags: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Restore what ``tags`` names on every live replica ("weights", "kv_cache"; none:
        both); requests are admitted again once nothing is asleep. Returns each replica's
        report; SleepModeError if one could not wake (it stays asleep: call again)."""
        woken = list(check_wake_tags(tags))
        if self._loop is None:
            self.start()
        async with self._sleep_lock:
            self._check_alive()
            return await asyncio.shield(self._control_all(("wake_up", woken)))

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError("the engine has stopped after an error") from self._dead

    async def _control_all(self, command: tuple[Any, ...]) -> list[dict[str, Any]]:
        """Send a sleep/wake command to every live replica and gather their answers."""
        loop = asyncio.get_running_loop()
        live = [r for r in self.replicas if r.alive]
        try:
            futures = []
            for r in live:
                fut: asyncio.Future[tuple[dict[str, Any], str | None]] = loop.create_future()
                r.pending_control.append(fut)
                r.client.send(command)
                futures.append(fut)
            answers = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            self._going_to_sleep = False  # the replicas' own state rules from now on
        reports: list[dict[str, Any]] = []
        errors: list[str] = []
        for r, answer in zip(live, answers):
            if isinstance(answer, BaseException):  # the replica died meanwhile
                reports.append({"engine": r.index, "alive": False, "error": str(answer)})
                continue
            report, error = answer
            r.sleeping = bool(report.get("is_sleeping"))
            reports.append({"engine": r.index, "pid": r.client.pid, **report})
            if error is not None:
                errors.append(f"engine {r.index}: {error}")
        self._check_alive()
        if errors:
            raise SleepModeError(f"{command[0]} failed: " + "; ".join(errors))
        logger.info("%s: %s", command[0], "asleep" if self.is_sleeping else "awake, serving again")
        return reports

    def _control_done(self, replica: Replica, report: dict[str, Any], error: str | None) -> None:
        if replica.pending_control:
            fut = replica.pending_control.popleft()
            if not fut.done():
                fut.set_result((report, error))

    def _abandon(self, request_id: str, state: dict[str, bool]) -> None:
        if not state["finished"] and self._loop is not None and not self._loop.is_closed():
            state["finished"] = True
            self._loop.call_soon_threadsafe(self.abort, request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request (all its n children); its blocks are freed before the next step."""
        ids = self._children.pop(request_id, [request_id])
        self._collectors.pop(request_id, None)
        engine = self._engine_of.pop(request_id, 0)
        replica = self.replicas[engine]
        if replica.alive:
            replica.client.send(("abort", ids))
        stats = IterationStats()
        self.output_processor.abort_requests(ids, stats)
        self._record(stats, None, engine)

    # ---- messages from the engine (reader thread -> event loop) ----------------------

    def _on_message(self, replica: Replica, msg: tuple[Any, ...]) -> None:
        loop = self._loop
        assert loop is not None
        if msg[0] in ("sleep_done", "wake_done"):
            loop.call_soon_threadsafe(self._control_done, replica, msg[1], msg[2])
            return
        if msg[0] == "step":
            _, outputs, stats, drained, seconds, events = msg
            replica.last_step_seconds = seconds
        else:  # "idle"
            _, stats, drained, events = msg
            outputs = []
        replica.drained = drained
        replica.core_waiting = stats.num_waiting
        loop.call_soon_threadsafe(self._handle, replica, outputs, stats, events)

    def _on_dead(self, replica: Replica, reason: str) -> None:
        if not any(r.alive for r in self.replicas if r is not replica):
            self._dead = EngineDeadError(reason)  # the last one: refuse new requests now
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._replica_died, replica, reason)
        else:
            self._replica_died(replica, reason)

    def _replica_died(self, replica: Replica, reason: str) -> None:
        if not replica.alive:
            return
        replica.alive = False
        replica.error = reason
        if self.router is not None:
            self.router.mark_dead(replica.index)
        while replica.pending_control:  # a sleep/wake it will never answer
            fut = replica.pending_control.popleft()
            if not fut.done():
                fut.set_exception(EngineDeadError(f"engine {replica.index} stopped: {reason}"))
        for callback in self.on_replica_dead:
            try:
                callback(replica.index, reason)
            except Exception:
                logger.exception("on_replica_dead callback failed")
        if any(r.alive for r in self.replicas):
            logger.error("engine %d died, the others go on serving: %s", replica.index, reason)
            error = EngineDeadError(f"engine {replica.index} stopped: {reason}")
            lost = [rid for rid, e in self._engine_of.items() if e == replica.index]
            for rid in lost:
                self._engine_of.pop(rid, None)
                collector = self._collectors.pop(rid, None)
                if collector is not None:
                    collector.fail(error)
                self.output_processor.abort_requests(self._children.pop(rid, [rid]))
            return
        logger.error("%s", reason)
        self._dead = self._dead or EngineDeadError(reason)
        self._fail_all(self._dead, reason)

    def _handle(
        self,
        replica: Replica,
        core_outputs: list[EngineCoreOutput],
        sched: SchedulerStats,
        events: tuple[list[bytes], list[bytes]],
    ) -> None:
        replica.last_stats = sched
        if self.router is not None and (events[0] or events[1]):
            self.router.record_kv_events(replica.index, *events)
        self._last_progress = time.monotonic()
        if self.stalled:
            self.stalled = False
            logger.warning("the engine is making progress again")
        stats = IterationStats()
        outputs, to_abort = self.output_processor.process_outputs(core_outputs, stats=stats)
        if to_abort and replica.alive:
            replica.client.send(("abort", to_abort))
        for out in outputs:
            collector = self._collectors.get(out.request_id)
            if collector is not None:
                collector.put(out)
            if out.finished:
                self._children.pop(out.request_id, None)
                self._engine_of.pop(out.request_id, None)
        self._record(stats, sched, replica.index)

    async def _watch(self, limit: float) -> None:
        """Mark the engine stalled (health 503) while it has work but no step has come
        back for ``limit`` seconds; cleared by the next step."""
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            busy = bool(self._collectors)
            if busy and not self.stalled and time.monotonic() - self._last_progress > limit:
                self.stalled = True
                logger.error(
                    "no engine step has completed for %.0f s with %d requests in flight",
                    time.monotonic() - self._last_progress, len(self._collectors),
                )  # fmt: skip

    def _record(
        self, stats: IterationStats | None, sched: SchedulerStats | None, engine: int = 0
    ) -> None:
        for stat_logger in self.stat_loggers:
            try:
                stat_logger.record(stats, sched, engine)
            except Exception:
                logger.exception("stat logger failed")

    def _fail_all(self, error: BaseException, reason: str) -> None:
        for collector in self._collectors.values():
            collector.fail(error)
        for callback in self.on_dead:
            try:
                callback(reason)
            except Exception:
                logger.exception("on_dead callback failed")
