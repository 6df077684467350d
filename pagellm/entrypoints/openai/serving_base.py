"""What completions and chat share: errors, model check, length checks, logprob and
stream helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from pagellm.engine.async_llm import AsyncLLM
from pagellm.lora.request import LoRARequest
from pagellm.outputs import Logprob

if TYPE_CHECKING:
    from pagellm.entrypoints.openai.serving_models import ServingModels

logger = logging.getLogger(__name__)

T = TypeVar("T")

_PARAM_RE = re.compile(r"^([a-z_]+) ")


_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_body(self) -> dict[str, Any]:
        """The error in the Anthropic Messages API's shape."""
        kind = _ANTHROPIC_ERROR_TYPES.get(
            self.status, "api_error" if self.status >= 500 else "invalid_request_error"
        )
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    @classmethod
    def bad_request(cls, message: str, param: str | None = None) -> APIError:
        if param is None:
            m = _PARAM_RE.match(message)
            param = m.group(1) if m else None
        return cls(400, message, "invalid_request_error", param)

    @classmethod
    def queue_full(cls, message: str) -> APIError:
        return cls(
            429, message, "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
        )

    @classmethod
    def engine_dead(cls) -> APIError:
        return cls(
            503, "The engine has stopped after an error.", "server_error", code="engine_dead"
        )


def session_of(headers: object, body: object) -> str | None:
    """A request's routing session: the ``X-Session-ID`` header, else the body's
    ``prompt_cache_key`` (OpenAI's routing hint), ``user``, or Anthropic's
    ``metadata.user_id``."""
    get = getattr(headers, "get", None)
    value = get("x-session-id") if get is not None else None
    if value:
        return str(value)
    for name in ("prompt_cache_key", "user"):
        value = getattr(body, name, None)
        if isinstance(value, str) and value:
            return value
    metadata = getattr(body, "metadata", None)
    user_id = getattr(metadata, "user_id", None)
    if user_id is None and isinstance(metadata, dict):
        user_id = metadata.get("user_id")
    return str(user_id) if user_id else None


def validation_error(errors: Sequence[Any]) -> APIError:
    """The 400 for a body its pydantic request model refused (``errors()`` of the
    ValidationError): the server's and run-batch's one wording, OpenAI's where it has one."""
    first: dict[str, Any] = dict(errors[0]) if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg"))
        return APIError.bad_request(f"Invalid JSON in the request body: {detail}")
    if first.get("type") == "extra_forbidden":
        return APIError.bad_request(
            f"Unrecognized request argument supplied: {'.'.join(loc)}", loc[-1] if loc else None
        )
    if first.get("type") == "missing":
        return APIError.bad_request(
            f"Missing required parameter: {'.'.join(loc)}", loc[-1] if loc else None
        )
    message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
    return APIError.bad_request(message, loc[0] if loc else None)


def error_of(e: BaseException) -> APIError:
    """The error to report for an exception met mid-stream (any protocol's stream);
    unexpected ones are logged, not shown."""
    from pagellm.engine.async_llm import EngineDeadError, QueueFullError

    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineDeadError):
        return APIError.engine_dead()
    if isinstance(e, QueueFullError):
        return APIError.queue_full(str(e))
    if isinstance(e, ValueError):
        return APIError.bad_request(str(e))
    logger.error("error while streaming", exc_info=e)
    return APIError(500, "Internal server error.", "server_error")


def stream_error(e: BaseException) -> str:
    """The SSE error event for an exception met mid-stream (the stream then ends with
    [DONE], as every accepted stream does)."""
    err = error_of(e)
    return sse(err.body())


def sse(data: BaseModel | dict[str, Any] | str, exclude: set[str] | None = None) -> str:
    """One Server-Sent Event line: ``data: <json>``."""
    if isinstance(data, BaseModel):
        payload = data.model_dump_json(exclude=exclude)
    elif isinstance(data, dict):
        payload = json.dumps(data, ensure_ascii=False)
    else:
        payload = data
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def merge_async_iterators(
    *iterators: AsyncIterator[T],
) -> AsyncGenerator[tuple[int, T], None]:
    """Yield (index, item) from several async iterators as items arrive.

    If the consumer stops early (client gone) every iterator is closed, which aborts
    its request.
    """
    queue: asyncio.Queue[tuple[int, T] | tuple[int, BaseException] | None] = asyncio.Queue()
    remaining = len(iterators)

    async def pump(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
        except BaseException as e:  # re-raised in the consumer
            await queue.put((i, e))
        finally:
            await queue.put(None)

    tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        while remaining:
            got = await queue.get()
            if got is None:
                remaining -= 1
                continue
            i, item = got
            if isinstance(item, BaseException):
                raise item
            yield i, item  # type: ignore[misc]
    finally:
        for t in tasks:
            t.cancel()
        for it in iterators:
            close = getattr(it, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()


def as_prompt_list(raw: Any) -> list[Any]:
    """A completions ``prompt`` or embeddings ``input`` as a list of prompts: a string or
    one list of token ids is one prompt; otherwise a list of them."""
    if isinstance(raw, str):
        return [raw]
    if raw and all(isinstance(t, int) for t in raw):
        return [raw]
    return list(raw)


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, models: ServingModels | Sequence[str]) -> None:
        from pagellm.entrypoints.openai.serving_models import ServingModels

        self.engine = engine
        self.models = (
            models if isinstance(models, ServingModels) else ServingModels(engine, list(models))
        )
        self.max_model_len = engine.config.model.max_model_len
        self.tokenizer = engine.tokenizer

    def check_model(self, name: str | None) -> str:
        """The name to report; 404 for a model this server does not serve."""
        return self.models.resolve(name)[0]

    def resolve_model(self, name: str | None) -> tuple[str, LoRARequest | None]:
        """The name to report and the LoRA adapter it names (None: the base model)."""
        return self.models.resolve(name)

    def resolve_max_tokens(
        self, prompt_len: int, max_tokens: int | None, what: str = "prompt"
    ) -> int:
        """Check the prompt and output fit max_model_len; default max_tokens to what is left."""
        limit = self.max_model_len
        if prompt_len >= limit:
            raise APIError.bad_request(
                f"This model's maximum context length is {limit} tokens, but the {what} has "
                f"{prompt_len} tokens; it must be shorter to leave room for output.",
                "messages" if what == "messages" else "prompt",
            )
        if max_tokens is None:
            return limit - prompt_len
        if max_tokens < 1:
            raise APIError.bad_request(
                f"max_tokens must be at least 1, got {max_tokens}", "max_tokens"
            )
        if prompt_len + max_tokens > limit:
            raise APIError.bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the "
                "completion). Please reduce the length of the prompt or completion.",
                "max_tokens",
            )
        return max_tokens

    def check_capacity(self, num_requests: int = 1) -> None:
        """429 at once when the waiting queue is full (before any streaming starts)."""
        limit = self.engine.max_queued_requests
        queued = self.engine.num_queued()
        if limit is not None and queued + num_requests > limit:
            raise APIError.queue_full(
                f"The server is busy: {queued} requests are already waiting (limit {limit}). Retry later."
            )
        if self.engine.errored:
            raise APIError.engine_dead()

    async def admit(
        self,
        prompts: list[tuple[dict[str, Any], Any]],
        request_id: str,
        priority: int,
        lora_request: Any = None,
    ) -> list[Any]:
        """Admit every prompt of one API request now, before any response starts (a full
        queue is 429 here, not a broken stream); all or none: if one is refused, the ones
        already admitted are aborted. An engine client with ``admit_request`` (the serving
        policy, pagellm.policy) admits asynchronously: it may embed or run a model first."""
        self.check_capacity(len(prompts))
        admit = getattr(self.engine, "admit_request", None)
        streams: list[Any] = []
        try:
            for i, (prompt, params) in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                if admit is not None:
                    stream = await admit(
                        prompt, params, rid, priority=priority, lora_request=lora_request
                    )
                else:
                    stream = self.engine.add_request(
                        prompt, params, rid, priority=priority, lora_request=lora_request
                    )
                streams.append(stream)
        except BaseException:
            for s in streams:
                s.abort_if_unfinished()
            raise
        return streams

    def tokenize_prompt(
        self, prompt: str | list[int], add_special_tokens: bool
    ) -> tuple[str | None, list[int]]:
        try:
            return self.engine.input_processor.tokenize(prompt, add_special_tokens)
        except ValueError as e:
            raise APIError.bad_request(str(e), "prompt") from None

    @staticmethod
    def top_entries(entry: dict[int, Logprob], n: int) -> list[tuple[int, Logprob]]:
        """The n most likely alternatives of a position (by rank)."""
        tops = [(t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= n]
        tops.sort(key=lambda x: x[1].rank or 0)
        return tops[:n]
