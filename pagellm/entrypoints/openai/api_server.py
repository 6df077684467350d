"""``pagellm serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn).

Routes: /v1/completions, /v1/chat/completions, /v1/responses (OpenAI Responses API),
/v1/messages and /v1/messages/count_tokens (Anthropic Messages API), /v1/embeddings,
/v1/models, /tokenize, /detokenize, /generate (legacy), /health, /version, /metrics, and
vLLM's sleep mode: POST /sleep?level=1|2, POST /wake_up[?tags=weights|kv_cache], GET
/is_sleeping (requests get 503 + Retry-After while asleep; /health stays 200), and the web
page (pagellm.ui: / redirects to the playground at /ui/, the dashboard at
/ui/dashboard.html, /server_info for its configuration half). With --api-key (or
PAGELLM_API_KEY) every route except /health, /version, /metrics and the page's own files
needs ``Authorization: Bearer KEY`` or ``x-api-key: KEY``.
Every error is an OpenAI error body; unexpected ones are logged with their traceback
and answered 500 without it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError as PydanticValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagellm import __version__, ui
from pagellm.benchmarks.report import machine_info
from pagellm.engine.arg_utils import EngineArgs
from pagellm.engine.async_llm import (
    AsyncLLM,
    EngineDeadError,
    EngineSleepingError,
    QueueFullError,
    SleepModeError,
    session_key,
)
from pagellm.entrypoints.anthropic.protocol import CountTokensRequest, MessagesRequest
from pagellm.entrypoints.anthropic.serving_messages import AnthropicServingMessages
from pagellm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    GenerateRequest,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
)
from pagellm.entrypoints.openai.protocol_responses import ResponsesRequest
from pagellm.entrypoints.openai.reasoning import REASONING_PARSERS
from pagellm.entrypoints.openai.serving_base import APIError, session_of, validation_error
from pagellm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagellm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagellm.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from pagellm.entrypoints.openai.serving_models import ServingModels, parse_lora_modules
from pagellm.entrypoints.openai.serving_responses import OpenAIServingResponses
from pagellm.metrics.prometheus import LoggingStatLogger, PrometheusStatLogger
from pagellm.policy.client import PolicyClient, PolicyHolder, cache_mode, response_headers
from pagellm.policy.client import api_key as policy_key
from pagellm.policy.config import PolicyError
from pagellm.sampling_params import RequestOutputKind, SamplingParams
from pagellm.utils import random_uuid

logger = logging.getLogger(__name__)

_OPEN_PATHS = ("/health", "/version", "/metrics", "/ping")


ANTHROPIC_PATHS = ("/v1/messages",)
"""Routes of the Anthropic Messages API: their errors take Anthropic's shape."""


def error_json(err: APIError, request: Request | None = None) -> JSONResponse:
    """The error as JSON: OpenAI's shape, or Anthropic's on the Anthropic routes."""
    anthropic = request is not None and request.url.path.startswith(ANTHROPIC_PATHS)
    body = err.anthropic_body() if anthropic else err.body()
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def sleeping_error(exc: EngineSleepingError) -> APIError:
    return APIError(
        503,
        "The engine is sleeping (sleep mode); POST /wake_up wakes it. Retry later.",
        "server_error",
        code="engine_sleeping",
        headers={"Retry-After": str(exc.retry_after)},
    )


def _parse_list(value: Any, default: list[str]) -> list[str]:
    """A CORS list option: a JSON list (vLLM's form) or comma-separated names."""
    if value is None:
        return default
    if isinstance(value, list):
        return value
    text = str(value).strip()
    if text.startswith("["):
        items = json.loads(text)
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ValueError(f"expected a JSON list of strings, got {text}")
        return items
    return [x.strip() for x in text.split(",") if x.strip()]


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_cancellable(request: Request, work: Awaitable[Any]) -> Any:
    """Run a non-streaming handler, cancelling it (and so aborting its engine requests)
    if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return Response(status_code=499)  # nobody is listening any more


def build_app(
    engine: AsyncLLM, args: argparse.Namespace, policy: PolicyHolder | None = None
) -> FastAPI:
    names = [engine.config.model.served_model_name]
    # The serving policy (--policy): a step around the engine client that every API's
    # admission goes through (pagellm.policy); a bad file stops start-up (ValueError).
    # ``policy``: one read already (serve() reads it before the model loads).
    policy_path = getattr(args, "policy", None)
    if policy is None and policy_path:
        policy = PolicyHolder(policy_path)
    served = ServingModels(engine, names)
    for lora_name, lora_path in parse_lora_modules(getattr(args, "lora_modules", None)):
        served.load(lora_name, lora_path)  # a bad adapter stops start-up (ValueError)
    client: Any = engine
    if policy is not None:
        client = PolicyClient(engine, policy, served)
        # The names the policy refers to must be served here: checked now and on reload.
        client.check_names(policy.config)
        policy.check = client.check_names
        served.routes = lambda: policy.config.routes
    allow_runtime_lora = bool(getattr(args, "allow_runtime_lora", False))
    completion = OpenAIServingCompletion(client, served)
    embedding = OpenAIServingEmbedding(client, served)
    chat = OpenAIServingChat(
        client,
        served,
        getattr(args, "tool_call_parser", "hermes"),
        getattr(args, "reasoning_parser", None),
    )
    lora_config = engine.config.lora
    prometheus = PrometheusStatLogger(
        names[0], lora_config.max_loras if lora_config else 0, len(engine.replicas)
    )
    engine.stat_loggers.append(prometheus)
    engine.on_replica_dead.append(lambda index, reason: prometheus.engine_died(index))
    if getattr(args, "log_stats", False):
        engine.stat_loggers.append(LoggingStatLogger())
    api_key = args.api_key or os.environ.get("PAGELLM_API_KEY") or None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="pagellm", version=__version__, lifespan=lifespan)
    origins = _parse_list(getattr(args, "allowed_origins", None), [])

    @app.middleware("http")
    async def authenticate(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        keyed = policy is not None and bool(policy.config.keys)
        needs_key = api_key or keyed
        if (
            needs_key
            and request.method != "OPTIONS"
            and not request.url.path.startswith(_OPEN_PATHS)
            and not ui.is_open_path(request.url.path)
        ):
            # OpenAI clients send "Authorization: Bearer KEY", Anthropic's "x-api-key: KEY".
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            token = token.strip() if scheme.lower() == "bearer" else ""
            token = token or request.headers.get("x-api-key", "").strip()
            ok = bool(api_key) and secrets.compare_digest(token.encode(), (api_key or "").encode())
            if keyed and not ok and policy is not None and policy.accepts(token):
                ok = True
                policy_key.set(token)  # the per-key limits read it at admission
            if not ok:
                return error_json(
                    APIError(
                        401,
                        "Incorrect or missing API key.",
                        "authentication_error",
                        None,
                        "invalid_api_key",
                    ),
                    request,
                )
        return await call_next(request)

    if origins:
        # Added after the authentication middleware, so it wraps it: a 401 carries the
        # CORS headers too, and preflight (OPTIONS) requests need no key.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=_parse_list(getattr(args, "allowed_methods", None), ["*"]),
            allow_headers=_parse_list(getattr(args, "allowed_headers", None), ["*"]),
            allow_credentials=bool(getattr(args, "allow_credentials", False)),
        )

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_json(validation_error(exc.errors()), request)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_json(APIError(exc.status_code, str(exc.detail), kind), request)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_json(exc, request)

    @app.exception_handler(QueueFullError)
    async def on_queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        return error_json(APIError.queue_full(str(exc)), request)

    @app.exception_handler(EngineDeadError)
    async def on_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return error_json(APIError.engine_dead(), request)

    @app.exception_handler(EngineSleepingError)
    async def on_sleeping(request: Request, exc: EngineSleepingError) -> JSONResponse:
        return error_json(sleeping_error(exc), request)

    @app.exception_handler(ValueError)
    async def on_value_error(request: Request, exc: ValueError) -> JSONResponse:
        return error_json(APIError.bad_request(str(exc)), request)

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_json(APIError(500, "Internal server error.", "server_error"), request)

    async def respond(request: Request, work: Awaitable[Any], body: Any = None) -> Response:
        # The routing session (data-parallel replicas): the engine reads it at admission,
        # inside the task that run_cancellable starts (which copies this context).
        session_key.set(session_of(request.headers, body))
        extra: dict[str, str] = {}  # filled at admission (the policy's x-ratelimit-*)
        response_headers.set(extra)
        cache_mode.set(request.headers.get("x-pagellm-cache", "").strip().lower() or None)
        result = await run_cancellable(request, work)
        if isinstance(result, Response):
            result.headers.update(extra)
            return result
        if isinstance(result, AsyncGenerator):
            return StreamingResponse(
                result, media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", **extra},
            )  # fmt: skip
        return JSONResponse(
            result if isinstance(result, dict) else result.model_dump(mode="json"), headers=extra
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await respond(request, completion.create(body), body)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await respond(request, embedding.create(body), body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await respond(request, chat.create(body), body)

    # The agent protocols, translated to and from chat (their errors on /v1/messages
    # take Anthropic's shape: see error_json).
    responses = OpenAIServingResponses(chat)
    messages = AnthropicServingMessages(chat)

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        return await respond(request, responses.create(body), body)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> dict[str, Any]:
        return responses.store.get(response_id).response

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict[str, Any]:
        responses.store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @app.post("/v1/messages")
    async def create_message(body: MessagesRequest, request: Request) -> Response:
        return await respond(request, messages.create(body), body)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensRequest) -> dict[str, int]:
        return messages.count_tokens(body)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=served.cards())

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        return served.card(model_id)

    def runtime_lora_allowed() -> None:
        if not allow_runtime_lora:
            raise APIError(404, "Loading LoRA adapters at run time is off; start the server "
                           "with --allow-runtime-lora (and --enable-lora).", "not_found_error")  # fmt: skip

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
        runtime_lora_allowed()
        try:
            lora = served.load(body.lora_name, body.lora_path)
        except ValueError as e:
            raise APIError.bad_request(str(e), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
        runtime_lora_allowed()
        await served.unload(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        completion.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError.bad_request("give exactly one of prompt or messages", "prompt")
        if body.messages is not None:
            msgs = [m.model_dump(exclude_none=True) for m in body.messages]
            text = engine.input_processor.apply_chat_template(msgs, body.add_generation_prompt)
            ids = engine.tokenizer.encode(text, add_special_tokens=False)
        else:
            assert body.prompt is not None
            ids = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(
            tokens=list(ids), count=len(ids), max_model_len=engine.config.model.max_model_len
        )

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        completion.check_model(body.model)
        ids = engine.input_processor.check_token_ids(body.tokens)
        return DetokenizeResponse(prompt=engine.tokenizer.decode(ids))

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        """The legacy vLLM endpoint: {"prompt", ...SamplingParams fields} -> {"text": [...]}.

        The body is JSON whatever the Content-Type says (``curl -d`` sends a form type)."""
        try:
            body = GenerateRequest.model_validate_json(await request.body())
        except PydanticValidationError as e:
            raise RequestValidationError(e.errors()) from None
        fields = dict(body.model_extra or {})
        _, lora = completion.resolve_model(body.model)
        session_key.set(session_of(request.headers, None))
        tokenized = completion.tokenize_prompt(body.prompt, True)
        fields.setdefault("max_tokens", completion.resolve_max_tokens(len(tokenized[1]), None))
        priority = fields.pop("priority", 0)
        kind = RequestOutputKind.CUMULATIVE if body.stream else RequestOutputKind.FINAL_ONLY
        params = SamplingParams(**fields, output_kind=kind)
        prefix = tokenized[0] or ""
        (gen,) = await completion.admit(
            [({"prompt": tokenized[0], "prompt_token_ids": tokenized[1]}, params)],
            f"gen-{random_uuid()}", priority, lora,
        )  # fmt: skip
        if body.stream:

            async def stream() -> AsyncGenerator[bytes, None]:
                async for out in gen:
                    yield (
                        json.dumps({"text": [prefix + c.text for c in out.outputs]}) + "\0"
                    ).encode()

            return StreamingResponse(stream(), media_type="application/octet-stream")

        async def final() -> dict[str, Any]:
            last = None
            async for out in gen:
                last = out
            assert last is not None
            return {"text": [prefix + c.text for c in last.outputs]}

        result = await run_cancellable(request, final())
        return result if isinstance(result, Response) else JSONResponse(result)

    @app.get("/health")
    async def health() -> Response:
        if engine.errored:
            return error_json(APIError.engine_dead())
        if len(engine.replicas) > 1:
            # Data parallel: 200 while any replica serves; the body names each one's state
            # ("degraded" once one has died: it is out of rotation, the others serve).
            engines = engine.health()
            ok = all(e["alive"] for e in engines)
            status = 503 if engine.stalled else 200
            body = {"status": "ok" if ok and status == 200 else "degraded", "engines": engines}
            return JSONResponse(body, status_code=status)
        if engine.stalled:
            return error_json(
                APIError(
                    503,
                    f"No engine step has completed for over {engine.step_timeout:.0f} s.",
                    "server_error",
                    code="engine_stalled",
                )
            )
        return Response(status_code=200)

    @app.get("/ping")
    async def ping() -> Response:
        return await health()

    # Sleep mode (vLLM's endpoints; behind the API key, unlike /health). Going to sleep
    # stops admitting (503) and waits for the requests in flight: vLLM's mode=wait.
    def sleep_mode_available() -> None:
        if not hasattr(engine, "sleep"):  # an engine client without it (Ray Serve's)
            raise APIError(
                501, "Sleep mode is not available with this engine.", "invalid_request_error"
            )

    @app.post("/sleep")
    async def sleep(request: Request, level: int = 1, mode: str = "wait") -> Response:
        sleep_mode_available()
        if mode != "wait":
            raise APIError.bad_request(
                f"mode={mode!r} is not supported: pagellm lets the requests in flight "
                "finish before it sleeps (mode=wait)",
                "mode",
            )
        try:
            result = await run_cancellable(request, engine.sleep(level))
        except SleepModeError as e:
            raise APIError(500, str(e), "server_error", code="sleep_failed") from None
        if isinstance(result, Response):
            return result
        return JSONResponse({"is_sleeping": engine.is_sleeping, "level": level, "engines": result})

    @app.post("/wake_up")
    async def wake_up(request: Request) -> Response:
        sleep_mode_available()
        tags = request.query_params.getlist("tags") or None
        try:
            result = await engine.wake_up(tags)
        except SleepModeError as e:
            raise APIError(500, str(e), "server_error", code="wake_up_failed") from None
        return JSONResponse({"is_sleeping": engine.is_sleeping, "engines": result})

    @app.get("/is_sleeping")
    async def is_sleeping() -> dict[str, bool]:
        return {"is_sleeping": bool(getattr(engine, "is_sleeping", False))}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        text = prometheus.render() + (policy.render().encode() if policy is not None else b"")
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def server_info() -> dict[str, Any]:
        """The dashboard's static half: what runs and how its memory is laid out."""
        cfg = policy.config if policy is not None else None
        return {
            "version": __version__,
            "models": [card.model_dump() for card in served.cards()],
            "engine_config": ui.engine_config(engine.config),
            "memory_plan": ui.memory_plan(engine.plan),
            "replicas": engine.health() if len(engine.replicas) > 1 else None,
            "machine": machine_info(),
            "api_key_required": bool(api_key) or bool(cfg and cfg.keys),
            "policy": None
            if cfg is None
            else {
                "path": cfg.path,
                "keys": sorted(k.name for k in cfg.keys.values()),
                "routes": sorted(cfg.routes),
                "response_cache": cfg.response_cache is not None,
                "rules": len(cfg.rules),
            },
        }

    ui.add_routes(app, server_info)
    app.state.policy = policy
    return app


async def serve(args: argparse.Namespace) -> int:
    engine_args = EngineArgs.from_cli_args(args)
    if args.model_positional:
        engine_args.model = args.model_positional
    if args.lora_modules:
        engine_args.enable_lora = True  # naming adapters is asking for LoRA
    lora_modules = parse_lora_modules(args.lora_modules)  # a malformed entry fails before start-up
    policy = None
    if getattr(args, "policy", None):
        try:
            policy = PolicyHolder(args.policy)  # a bad file fails before the model loads
        except PolicyError as e:
            logger.error("%s", e)
            return 2
    engine = AsyncLLM.from_engine_args(
        engine_args, max_queued_requests=args.max_queued_requests, step_timeout=args.step_timeout
    )
    try:
        app = build_app(engine, args, policy)
    except ValueError as e:
        if lora_modules and not isinstance(e, PolicyError):
            logger.error("%s (--lora-modules %s)", e, " ".join(f"{n}={p}" for n, p in lora_modules))
        else:
            logger.error("%s", e)
        engine.shutdown()
        return 2
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        timeout_graceful_shutdown=args.shutdown_timeout,
        timeout_keep_alive=5,
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        # First signal: graceful (stop accepting, drain for --shutdown-timeout, then
        # cancel the rest); a second one: exit at once.
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    if app.state.policy is not None:  # SIGHUP: read the policy file again
        loop.add_signal_handler(signal.SIGHUP, app.state.policy.reload)
    exit_code = 0

    def on_engine_dead(reason: str) -> None:
        # Every in-flight stream has its error already; stop serving and exit non-zero
        # so that a supervisor restarts the server.
        nonlocal exit_code
        exit_code = 1
        server.should_exit = True

    engine.on_dead.append(on_engine_dead)
    logger.info(
        "serving %s on http://%s:%d (engine process %s)", engine.config.model.served_model_name,
        args.host, args.port, ", ".join(str(r.client.pid) for r in engine.replicas),
    )  # fmt: skip
    try:
        await server.serve()
    finally:
        engine.shutdown()
    logger.info("server stopped")
    return exit_code


class _Server(uvicorn.Server):
    """uvicorn re-raises the signal it caught after shutting down, which ends the process
    with -SIGTERM; pagellm handles SIGINT/SIGTERM itself and exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def run(args: argparse.Namespace) -> int:
    # SIGTERM and SIGINT (see serve's on_signal): stop accepting, let in-flight requests
    # finish for --shutdown-timeout seconds, cancel (abort) the rest, exit 0.
    return asyncio.run(serve(args))


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="start the OpenAI-compatible server")
    p.add_argument("model_positional", nargs="?", default=None, metavar="MODEL",
                   help="model directory, .gguf file or hub id (default: SmolLM2-135M-Instruct)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key", default=None, help="require this bearer key (or set PAGELLM_API_KEY)"
    )
    p.add_argument("--policy", default=None, metavar="FILE",
                   help="serving policy (guardrails, per-key limits, dead-loop stops): a "
                   "YAML file, docs/policy.md; reloaded on SIGHUP")  # fmt: skip
    p.add_argument("--max-queued-requests", type=int, default=None,
                   help="refuse new requests with 429 while this many wait")  # fmt: skip
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests get to finish on SIGTERM/SIGINT")  # fmt: skip
    p.add_argument("--tool-call-parser", default="hermes", choices=("hermes", "llama3_json"),
                   help="how tool calls are found in replies (tool_choice auto)")  # fmt: skip
    p.add_argument("--step-timeout", type=float, default=120.0,
                   help="a step longer than this (seconds) is logged and turns /health 503 "
                   "until steps complete again (0: no watchdog)")  # fmt: skip
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="LoRA adapters served under their own model name: name=path or "
                   "'{\"name\": ..., \"path\": ...}' (implies --enable-lora)")  # fmt: skip
    p.add_argument("--allow-runtime-lora", action="store_true",
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter")  # fmt: skip
    p.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="split a reasoning model's <think>...</think> from its answer: "
                   "reasoning_content in chat, reasoning items in Responses")  # fmt: skip
    p.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                   help="CORS: origins allowed to call the API from a browser, a JSON list "
                   "('[\"*\"]') or comma-separated (default: none, CORS off)")  # fmt: skip
    p.add_argument("--allowed-methods", default=None, help="CORS methods (default: all)")
    p.add_argument("--allowed-headers", default=None, help="CORS headers (default: all)")
    p.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    p.add_argument("--uvicorn-log-level", default="warning")
    # vLLM flags whose behaviour pagellm always has (docs/vllm_flags.md): accepted, they act.
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted: tool_choice auto is always served (see --tool-call-parser)")  # fmt: skip
    p.add_argument("--disable-log-requests", action="store_true",
                   help="accepted: pagellm never logs request contents")  # fmt: skip
    EngineArgs.add_cli_args(p)
    p.set_defaults(handler=run)


if __name__ == "__main__":
    # vLLM's old entry point: `python -m pagellm.entrypoints.openai.api_server --model X ...`
    # is `pagellm serve --model X ...`.
    import sys

    from pagellm.entrypoints import cli

    sys.exit(cli.main(["serve", *sys.argv[1:]]))
