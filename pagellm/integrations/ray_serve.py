"""Ray Serve: pagellm's OpenAI-compatible server as one Serve application.

    HTTP --> Serve proxy --> PagellmIngress (FastAPI: pagellm's own build_app)
                             ServeEngineClient: tokenize, chat template, validate
                                   | handle.options(stream=True).generate.remote(EngineRequest)
                                   | PagellmRequestRouter: cache-aware replica choice
                                   v
                             PagellmEngine x N (autoscaled; one AsyncLLM each)
                             engine core, detokenize, stop strings -> RequestOutputs

``PagellmIngress`` serves the app of ``pagellm serve`` (every OpenAI and Anthropic route,
SSE streaming, auth, error bodies) over a ``ServeEngineClient``, an object with the part of
``AsyncLLM`` the serving classes use. It tokenizes and validates each request where the
request arrives (a bad one is a 400 before any response starts), then streams the request
from an engine replica: ``PagellmEngine`` holds one ``AsyncLLM`` (its engine core in its own
process, as under ``pagellm serve``) and yields the ``RequestOutput`` objects that AsyncLLM
yields, text included, so streamed responses are built exactly as by ``pagellm serve``.
Closing or cancelling the stream (client gone) cancels the Serve call, which aborts the
request in its engine.

``PagellmRequestRouter`` is the engine deployment's Serve request router: it reads the
prompt's token ids, cache key, adapter and session from the ``EngineRequest`` argument and
asks a ``pagellm.engine.router.Router`` (the one ``--data-parallel-size`` uses) which
replica to take. Engine replicas report no KV events to Serve, so the router runs in its
routing-history mode (a prompt counts as cached on the replica it was routed to, bounded
per replica); a replica's load is the larger of the prompt tokens this router has in flight
there and the running + waiting tokens the replica last reported (Serve's routing stats).
Calls that carry no EngineRequest (``engine_config``, ``stats``, ``health``) take the less
busy of two random replicas, Serve's power of two choices.

Importing this module imports Ray Serve; ``import pagellm`` never does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import weakref
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

from pagellm.engine.router import Router
from pagellm.entrypoints.openai.serving_base import APIError

if TYPE_CHECKING:
    from ray.serve.deployment import Application
    from ray.serve.handle import DeploymentHandle

    from pagellm.config import EngineConfig
    from pagellm.engine.async_llm import AsyncLLM
    from pagellm.lora.request import LoRARequest
    from pagellm.outputs import RequestOutput
    from pagellm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = [
    "EngineRequest",
    "PagellmEngine",
    "PagellmIngress",
    "PagellmRequestRouter",
    "ReplicaChooser",
    "ServeEngineClient",
    "build_app",
]

ENGINE_DEPLOYMENT = "PagellmEngine"
INGRESS_DEPLOYMENT = "PagellmIngress"


@dataclass
class EngineRequest:
    """One admitted request on its way from the ingress to an engine replica: what
    ``AsyncLLM.add_request`` takes, plus what the request router routes by."""

    request_id: str
    prompt: Any
    """The prompt as the serving classes gave it (a dict with its token ids)."""
    params: SamplingParams
    add_special_tokens: bool = True
    priority: int = 0
    lora_request: LoRARequest | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    """The prompt's token ids as the ingress tokenized them (what the router hashes)."""
    cache_key: object = None
    """The prefix-cache key of the request (cache salt, adapter), as its engine keys it."""
    lora_id: int = 0
    session: str | None = None
    """The routing session (X-Session-ID, prompt_cache_key, user): sticky replica."""


class EngineRefusal(Exception):
    """An engine replica refused a request (its queue is full: ``max_queued_requests``);
    the ingress answers it as ``pagellm serve`` does (429). A plain exception, because
    QueueFullError does not survive pickling between processes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


# ---- the engine replica ------------------------------------------------------------------


class PagellmEngine:
    """A Serve replica holding one pagellm engine (``AsyncLLM``, data_parallel_size 1).

    Every method is async: Serve runs sync methods in a thread pool, while AsyncLLM lives
    on the replica's event loop (started by the first call, from that loop)."""

    def __init__(
        self,
        engine_kwargs: Mapping[str, Any] | None = None,
        max_queued_requests: int | None = None,
        step_timeout: float | None = 120.0,
    ) -> None:
        from pagellm.engine.arg_utils import EngineArgs
        from pagellm.engine.async_llm import AsyncLLM
        from pagellm.integrations.ray_data import _assigned_cpus

        kwargs = dict(engine_kwargs or {})
        if kwargs.get("data_parallel_size", 1) != 1:
            raise ValueError(
                "data_parallel_size must be 1 in a Serve replica: Serve runs the replicas "
                "(min_replicas / max_replicas)"
            )
        if kwargs.get("num_threads") is None:
            threads = _assigned_cpus()
            if threads is not None:
                kwargs["num_threads"] = threads
        config = EngineArgs(**kwargs).create_engine_config()
        self.engine: AsyncLLM = AsyncLLM(
            config, max_queued_requests=max_queued_requests, step_timeout=step_timeout
        )
        self.num_finished = 0
        self.num_aborted = 0
        """Requests whose call ended before their last output (client gone, cancelled)."""
        logger.info("pagellm Serve replica ready (threads: %s)", kwargs.get("num_threads"))

    async def generate(self, request: EngineRequest) -> AsyncGenerator[RequestOutput, None]:
        """Admit the request and yield its outputs (call with ``stream=True``); a
        cancelled call aborts the request, which frees its KV blocks."""
        from pagellm.engine.async_llm import QueueFullError

        self.engine.start()
        try:
            stream = self.engine.add_request(
                request.prompt, request.params, request.request_id, request.add_special_tokens,
                request.priority, request.lora_request,
            )  # fmt: skip
        except QueueFullError as e:
            raise EngineRefusal(429, str(e)) from None
        # Whether the last output was handed over (stream.finished is set by an abort too).
        completed = False
        try:
            async for out in stream:
                completed = out.finished
                yield out
        finally:
            if completed:
                self.num_finished += 1
            else:
                self.num_aborted += 1
                stream.abort_if_unfinished()

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def engine_config(self) -> EngineConfig:
        """The replica's resolved config: the ingress tokenizes and checks with it."""
        return self.engine.config

    async def health(self) -> dict[str, Any]:
        """The engine's state: alive, pid, running/waiting requests, KV usage."""
        self.engine.start()
        (state,) = self.engine.health()
        return {**state, "stalled": self.engine.stalled}

    async def stats(self) -> dict[str, Any]:
        """Requests finished and aborted by this replica, and its scheduler's state."""
        s = self.engine.last_stats
        return {
            "num_finished": self.num_finished,
            "num_aborted": self.num_aborted,
            "num_unfinished": self.engine.num_unfinished(),
            "num_requests_running": s.num_running,
            "num_requests_waiting": s.num_waiting,
            "kv_cache_usage": s.kv_cache_usage,
            "prefix_cache_queries": s.prefix_cache_queries,
            "prefix_cache_hits": s.prefix_cache_hits,
        }

    async def check_health(self) -> None:
        """Serve's health check: a dead engine fails it, and Serve replaces the replica."""
        self.engine.start()  # so that its death is noticed before any request
        if self.engine.errored:
            raise RuntimeError("the pagellm engine has stopped after an error")

    async def record_routing_stats(self) -> dict[str, Any]:
        """What PagellmRequestRouter reads (every request_routing_stats_period_s)."""
        s = self.engine.last_stats
        return {
            "num_tokens": s.num_running_tokens + s.num_waiting_tokens,
            "num_running": s.num_running,
            "num_waiting": s.num_waiting,
            "kv_cache_usage": s.kv_cache_usage,
            "num_blocks": self.engine.plan.num_blocks,
        }

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(2.0)


# ---- the ingress ---------------------------------------------------------------------------


class _Replicas:
    """``len(engine.replicas)`` for build_app: one logical engine (Serve replaces dead
    replicas itself, so /health answers for the ingress)."""

    def __len__(self) -> int:
        return 1


class RemoteStream:
    """One request's outputs from an engine replica, in the shape of AsyncLLM's
    ``RequestStream``: iterate it; ``abort_if_unfinished`` (also ``aclose``, and a
    stream dropped unread) cancels the Serve call, which aborts the request there."""

    def __init__(self, client: ServeEngineClient, request: EngineRequest) -> None:
        self.request_id = request.request_id
        self._gen: Any = client.stream_handle.generate.remote(request)
        self._state = {"finished": False}
        weakref.finalize(self, _cancel_unfinished, self._gen, self._state)

    @property
    def finished(self) -> bool:
        return self._state["finished"]

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            out: RequestOutput = await self._gen.__anext__()
        except StopAsyncIteration:
            self._state["finished"] = True
            raise
        except RayTaskError as e:
            self.abort_if_unfinished()
            cause = e.cause
            if isinstance(cause, EngineRefusal):
                raise APIError.queue_full(cause.message) from None
            if isinstance(cause, Exception):
                raise cause from None  # the engine's own error: 400, 503 as usual
            raise
        except BaseException:
            self.abort_if_unfinished()
            raise
        if out.finished:
            self._state["finished"] = True
        return out

    def abort_if_unfinished(self) -> None:
        if not self.finished:
            self._state["finished"] = True
            _cancel(self._gen)

    async def aclose(self) -> None:
        self.abort_if_unfinished()


def _cancel(gen: Any) -> None:
    """Cancel a Serve call without blocking the event loop: before the request is
    assigned to a replica, ``cancel()`` waits for the assignment."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is None:
        gen.cancel()
    else:
        loop.run_in_executor(None, gen.cancel).add_done_callback(_log_cancel_error)


def _log_cancel_error(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("cancelling a Serve call failed: %s", future.exception())


def _cancel_unfinished(gen: Any, state: dict[str, bool]) -> None:
    if not state["finished"]:
        state["finished"] = True
        _cancel(gen)


class ServeEngineClient:
    """What the serving classes and ``build_app`` use of ``AsyncLLM``, over a handle to
    the PagellmEngine deployment. The tokenizer, chat template and input checks run here,
    with an engine replica's config; generation and detokenization run in the replicas."""

    def __init__(self, handle: DeploymentHandle, config: EngineConfig) -> None:
        from pagellm.engine.input_processor import InputProcessor
        from pagellm.engine.tokenizer import load_tokenizer

        self.handle = handle
        self.stream_handle = handle.options(stream=True)
        self.config = config
        self.tokenizer = load_tokenizer(config.model.tokenizer, config.model.chat_template)
        self.input_processor = InputProcessor(config.model, self.tokenizer, config.lora)
        self.max_queued_requests: int | None = None  # Serve's max_queued_requests applies
        self.stat_loggers: list[Any] = []
        """Appended to by build_app; engine metrics stay in the replicas (see the docs)."""
        self.on_dead: list[Callable[[str], None]] = []
        self.on_replica_dead: list[Callable[[int, str], None]] = []
        self.replicas = _Replicas()
        self.step_timeout: float | None = None
        self.stalled = False
        self.errored = False

    def start(self) -> None:
        pass

    def shutdown(self, timeout: float = 10.0) -> None:
        pass  # the engine replicas belong to their own deployment

    def num_queued(self) -> int:
        return 0

    def health(self) -> list[dict[str, Any]]:
        return [{"engine": 0, "alive": True}]

    def add_request(
        self,
        prompt: Any,
        params: SamplingParams,
        request_id: str,
        add_special_tokens: bool = True,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> RemoteStream:
        """Check the request here (ValueError before any response starts, as AsyncLLM
        does) and start it on an engine replica; returns its output stream."""
        from pagellm.engine.async_llm import session_key

        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        checked, _ = self.input_processor.process(
            request_id, prompt, params.clone(), None, add_special_tokens, None, lora_request
        )
        request = EngineRequest(
            request_id=request_id,
            prompt=prompt,
            params=params,
            add_special_tokens=add_special_tokens,
            priority=priority,
            lora_request=lora_request,
            prompt_token_ids=list(checked.prompt_token_ids),
            cache_key=checked.cache_key,
            lora_id=checked.lora_id,
            session=session_key.get(),
        )
        return RemoteStream(self, request)

    def abort(self, request_id: str) -> None:
        """Requests are aborted through their streams (cancelling the Serve call)."""

    async def remove_lora(self, lora_id: int, poll: float = 0.05) -> None:
        self.input_processor.forget_lora(lora_id)


def _server_args(server_kwargs: Mapping[str, Any] | None) -> argparse.Namespace:
    """``pagellm serve``'s options (defaults, with ``server_kwargs`` over them)."""
    from pagellm.entrypoints.openai import api_server

    parser = argparse.ArgumentParser()
    api_server.add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve"])
    for key, value in dict(server_kwargs or {}).items():
        if not hasattr(args, key):
            raise ValueError(f"server_kwargs: {key!r} is not a `pagellm serve` option")
        setattr(args, key, value)
    if args.allow_runtime_lora:
        raise ValueError(
            "allow_runtime_lora is not supported on Ray Serve: each ingress replica keeps "
            "its own adapter names; give adapters at start-up (lora_modules)"
        )
    return args


@serve.ingress()
class PagellmIngress:
    """The Serve ingress: pagellm's FastAPI app over a ServeEngineClient. It takes the
    engine config from an engine replica (resolved where the engine runs: device, dtype,
    max_model_len), so it starts once one replica is up."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self, engine: DeploymentHandle, server_kwargs: Mapping[str, Any] | None = None
    ) -> None:
        self.args = _server_args(server_kwargs)
        config = await engine.engine_config.remote()
        self.client = ServeEngineClient(engine, config)

    def __serve_build_asgi_app__(self) -> Any:
        from pagellm.entrypoints.openai import api_server

        return api_server.build_app(self.client, self.args)  # type: ignore[arg-type]


# ---- cache-aware routing --------------------------------------------------------------------


class ReplicaChooser:
    """Replica choice over Serve replica ids (no Ray needed): a pagellm ``Router`` in
    routing-history mode, each replica id mapped to a Router engine index (replicas that
    join get new indexes, replicas that leave are marked dead), and the prompt tokens
    in flight on each replica. One per request router: not thread-safe, called from
    the router's event loop."""

    def __init__(
        self,
        block_size: int,
        *,
        capacity_blocks: int = 1 << 16,
        lora_miss_cost: int = 256,
        max_loras_per_engine: int = 1,
        max_sessions: int = 100_000,
        max_tracked_requests: int = 100_000,
    ) -> None:
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self._router_kwargs = {
            "lora_miss_cost": lora_miss_cost,
            "max_loras_per_engine": max_loras_per_engine,
            "max_sessions": max_sessions,
        }
        self.router: Router | None = None
        self.index_of: dict[str, int] = {}
        self.id_of: dict[int, str] = {}
        self.reported: dict[str, int] = {}
        """Tokens each replica last reported (running + waiting), all routers' requests."""
        self.inflight: dict[str, int] = {}
        """Prompt tokens of this router's requests on each replica that have not finished."""
        self._requests: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._max_tracked = max_tracked_requests

    def update(
        self, replica_ids: Sequence[str], stats: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        """The replicas now running (and their routing stats): new ids get an index."""
        live = set(replica_ids)
        for rid in [r for r in self.index_of if r not in live]:
            idx = self.index_of.pop(rid)
            self.id_of.pop(idx, None)
            self.reported.pop(rid, None)
            self.inflight.pop(rid, None)
            assert self.router is not None
            self.router.mark_dead(idx)
        new = [r for r in replica_ids if r not in self.index_of]
        if new and self.router is None:
            self.router = Router(
                len(new), self.block_size, pending_ttl=None,
                capacity_blocks=self.capacity_blocks, **self._router_kwargs,
            )  # fmt: skip
            indexes = list(range(len(new)))
        else:
            assert self.router is not None or not new
            indexes = [self.router.add_engine() for _ in new] if self.router else []
        for rid, idx in zip(new, indexes):
            self.index_of[rid] = idx
            self.id_of[idx] = rid
        for rid, s in (stats or {}).items():
            if rid not in self.index_of:
                continue
            if isinstance(s.get("num_tokens"), int):
                self.reported[rid] = s["num_tokens"]
            blocks = s.get("num_blocks")
            if isinstance(blocks, int) and blocks > 0 and self.router is not None:
                # Remember as much as the replica's KV cache holds (at least a few prompts).
                self.router.indexes[self.index_of[rid]].capacity = max(blocks, 64)

    def load(self, replica_id: str) -> int:
        return max(self.inflight.get(replica_id, 0), self.reported.get(replica_id, 0))

    def rank(
        self,
        candidate_ids: Sequence[str],
        request: EngineRequest,
        request_key: str | None = None,
    ) -> list[str]:
        """Candidates best first: the Router's choice, then the rest by load. Records the
        request as in flight on the choice (under ``request_key``) until ``finished``."""
        known = [r for r in candidate_ids if r in self.index_of]
        if not known:
            return list(candidate_ids)
        assert self.router is not None
        if request_key is not None:
            self.finished(request_key)  # a retry: routed again
        allowed = set(known)
        loads = [0] * self.router.num_engines
        saved_alive = list(self.router.alive)
        for idx, rid in self.id_of.items():
            loads[idx] = self.load(rid)
            if rid not in allowed:
                self.router.alive[idx] = False  # not a candidate this time
        try:
            decision = self.router.route(
                request.prompt_token_ids, loads, cache_key=request.cache_key,
                lora_id=request.lora_id, session=request.session,
            )  # fmt: skip
        finally:
            self.router.alive = saved_alive
        chosen = self.id_of[decision.engine]
        if request_key is not None:
            tokens = len(request.prompt_token_ids)
            self.inflight[chosen] = self.inflight.get(chosen, 0) + tokens
            self._requests[request_key] = (chosen, tokens)
            while len(self._requests) > self._max_tracked:  # calls Serve never completed
                self._forget(*self._requests.popitem(last=False)[1])
        rest = sorted((r for r in known if r != chosen), key=self.load)
        return [chosen, *rest, *(r for r in candidate_ids if r not in self.index_of)]

    def finished(self, request_key: str) -> None:
        """A routed request completed (or is routed again): its tokens leave the load."""
        entry = self._requests.pop(request_key, None)
        if entry is not None:
            self._forget(*entry)

    def _forget(self, replica_id: str, tokens: int) -> None:
        if replica_id in self.inflight:
            self.inflight[replica_id] = max(0, self.inflight[replica_id] - tokens)


def engine_request_of(pending_request: Any) -> EngineRequest | None:
    """The EngineRequest a pending Serve call carries (first positional argument or the
    ``request`` keyword), or None."""
    args = getattr(pending_request, "args", None) or ()
    for arg in args:
        if isinstance(arg, EngineRequest):
            return arg
    kwargs = getattr(pending_request, "kwargs", None) or {}
    value = kwargs.get("request")
    return value if isinstance(value, EngineRequest) else None


class PagellmRequestRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Serve request router of PagellmEngine: cache-aware, load-aware, LoRA-aware and
    session-sticky choice through pagellm's Router (see ReplicaChooser). No FIFOMixin:
    the replica chosen for a request is the one that request gets."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.chooser = ReplicaChooser(**kwargs)

    def _sync(self) -> None:
        replicas = list(self._replicas.values())
        ids = [_replica_key(r) for r in replicas]
        self.chooser.update(ids, {_replica_key(r): r.routing_stats or {} for r in replicas})

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        if hasattr(self, "chooser"):
            self._sync()

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        if hasattr(self, "chooser"):
            self._sync()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        request = engine_request_of(pending_request) if pending_request is not None else None
        if request is None or not request.prompt_token_ids:
            # Serve's power of two choices (the lower queue of two random replicas).
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {_replica_key(r): r for r in candidate_replicas}
        if any(rid not in self.chooser.index_of for rid in by_id):
            self._sync()
        assert pending_request is not None
        ranked = self.chooser.rank(
            list(by_id), request, pending_request.metadata.internal_request_id
        )
        return [[by_id[rid]] for rid in ranked]

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        if hasattr(self, "chooser"):
            self.chooser.finished(internal_request_id)


def _replica_key(replica: RunningReplica) -> str:
    return str(replica.replica_id.unique_id)


# ---- the application ------------------------------------------------------------------------


def build_app(
    engine_kwargs: Mapping[str, Any] | None = None,
    *,
    min_replicas: int = 1,
    max_replicas: int = 1,
    initial_replicas: int | None = None,
    target_ongoing_requests: float = 16,
    max_ongoing_requests: int = 64,
    num_cpus_per_replica: float = 1,
    num_gpus_per_replica: float = 0,
    accelerator_type: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    max_queued_requests: int | None = None,
    step_timeout: float | None = 120.0,
    server_kwargs: Mapping[str, Any] | None = None,
    num_ingress_replicas: int = 1,
    ingress_num_cpus: float = 0,
    routing_capacity_blocks: int = 1 << 16,
    routing_stats_period_s: float = 2.0,
) -> Application:
    """The Serve application: ``serve.run(build_app({...}), route_prefix="/")``.

    ``engine_kwargs``: EngineArgs fields (as ``pagellm.LLM`` takes them) of every engine
    replica; without ``num_threads`` a replica uses one thread per CPU Ray gave it.
    ``min_replicas`` .. ``max_replicas`` engine replicas, autoscaled by Serve towards
    ``target_ongoing_requests`` requests per replica (at most ``max_ongoing_requests``
    each; more wait in the ingress's handle). ``server_kwargs``: ``pagellm serve`` options
    of the ingress (api_key, lora_modules, reasoning_parser, tool_call_parser,
    allowed_origins, ...). ``routing_capacity_blocks``: KV blocks of routing history
    per replica until a replica reports its KV cache size."""
    from pagellm.engine.arg_utils import EngineArgs

    kwargs = dict(engine_kwargs or {})
    if (server_kwargs or {}).get("lora_modules"):
        kwargs["enable_lora"] = True  # naming adapters is asking for LoRA (as pagellm serve)
    if not 1 <= min_replicas <= max_replicas:
        raise ValueError(
            f"need 1 <= min_replicas <= max_replicas, got {min_replicas} and {max_replicas}"
        )
    if num_cpus_per_replica <= 0:
        raise ValueError(f"num_cpus_per_replica must be positive, got {num_cpus_per_replica}")
    _server_args(server_kwargs)  # a bad option fails here, not in a replica
    args = EngineArgs(**kwargs)  # so does an unknown engine option (the model is not read)
    max_loras = (args.max_cpu_loras or args.max_loras or 1) if args.enable_lora else 1
    actor_options: dict[str, Any] = {"num_cpus": num_cpus_per_replica}
    if num_gpus_per_replica:
        actor_options["num_gpus"] = num_gpus_per_replica
    if accelerator_type is not None:
        actor_options["accelerator_type"] = accelerator_type
    if runtime_env is not None:
        actor_options["runtime_env"] = runtime_env
    autoscaling = AutoscalingConfig(
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        initial_replicas=initial_replicas,
        target_ongoing_requests=target_ongoing_requests,
    )
    router_options: dict[str, Any] = {
        "request_router_class": PagellmRequestRouter,
        "request_router_kwargs": {
            "block_size": args.block_size,
            "capacity_blocks": routing_capacity_blocks,
            "max_loras_per_engine": max_loras,
        },
        "request_routing_stats_period_s": routing_stats_period_s,
    }
    engine = serve.deployment(
        name=ENGINE_DEPLOYMENT,
        ray_actor_options=actor_options,
        autoscaling_config=autoscaling,
        max_ongoing_requests=max_ongoing_requests,
        request_router_config=RequestRouterConfig(**router_options),
    )(PagellmEngine).bind(kwargs, max_queued_requests, step_timeout)
    ingress_options: dict[str, Any] = {"num_cpus": ingress_num_cpus}
    if runtime_env is not None:
        ingress_options["runtime_env"] = runtime_env
    ingress = serve.deployment(
        name=INGRESS_DEPLOYMENT,
        num_replicas=num_ingress_replicas,
        ray_actor_options=ingress_options,
        max_ongoing_requests=max(max_ongoing_requests * max_replicas, 256),
    )(PagellmIngress)
    return ingress.bind(engine, dict(server_kwargs or {}))
