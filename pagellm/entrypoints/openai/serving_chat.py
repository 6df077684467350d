"""POST /v1/chat/completions: the model's chat template, streamed or not."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from pagellm.core.structured_output import StructuredOutputsParams
from pagellm.entrypoints.openai.protocol import (
    UNSUPPORTED_CHAT_FIELDS,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    TopLogprob,
    UsageInfo,
)
from pagellm.entrypoints.openai.serving_base import (
    SSE_DONE,
    APIError,
    OpenAIServing,
    sse,
    stream_error,
)
from pagellm.entrypoints.openai.tool_calls import (
    ParsedToolCall,
    calls_from_required,
    function_schemas,
    get_tool_parser,
    required_schema,
    tools_system_prompt,
)
from pagellm.outputs import CompletionOutput, Logprob
from pagellm.sampling_params import RequestOutputKind, SamplingParams
from pagellm.utils import random_uuid


@dataclass
class ToolMode:
    """How a chat request uses its tools: ``kind`` is none, auto, required or named."""

    kind: str = "none"
    name: str | None = None


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: Any, served_model_names: Any, tool_parser: str = "hermes") -> None:
        super().__init__(engine, served_model_names)
        self.tool_parser = get_tool_parser(tool_parser)

    def render_prompt(
        self, req: ChatCompletionRequest, tools: list[dict[str, Any]] | None = None
    ) -> str:
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        if not messages:
            raise APIError.bad_request("messages must not be empty", "messages")
        add_gen = req.add_generation_prompt and not req.continue_final_message
        kwargs: dict[str, Any] = dict(req.chat_template_kwargs or {})
        if req.continue_final_message:
            kwargs["continue_final_message"] = True
        apply = self.engine.input_processor.apply_chat_template
        try:
            text = apply(messages, add_gen, req.chat_template, **kwargs)
            if not tools:
                return str(text)
            with_tools = apply(messages, add_gen, req.chat_template, tools=tools, **kwargs)
            if with_tools != text:
                return str(with_tools)
            # The template ignores tools: describe them in the system message instead.
            prompt = tools_system_prompt(tools, self.tool_parser)
            if messages[0].get("role") == "system":
                first = messages[0]
                messages[0] = {
                    **first,
                    "content": f"{first.get('content') or ''}\n\n{prompt}".strip(),
                }
            else:
                messages.insert(0, {"role": "system", "content": prompt})
            return str(apply(messages, add_gen, req.chat_template, **kwargs))
        except ValueError as e:
            raise APIError.bad_request(str(e), "messages") from None

    def _tool_mode(self, req: ChatCompletionRequest) -> tuple[ToolMode, dict[str, dict[str, Any]]]:
        """The request's tool use and its functions' parameter schemas (400 if malformed)."""
        choice = req.tool_choice
        if not req.tools:
            if choice not in (None, "none"):
                raise APIError.bad_request("tool_choice needs tools", "tool_choice")
            return ToolMode(), {}
        try:
            schemas = function_schemas(req.tools)
        except ValueError as e:
            raise APIError.bad_request(str(e), "tools") from None
        if choice is None or choice in ("auto", "none", "required"):
            return ToolMode(choice or "auto"), schemas
        fn = choice.get("function") if isinstance(choice, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if (
            not isinstance(choice, dict)
            or choice.get("type") != "function"
            or not isinstance(name, str)
        ):
            raise APIError.bad_request(
                'tool_choice must be "none", "auto", "required" or '
                '{"type": "function", "function": {"name": ...}}', "tool_choice"
            )  # fmt: skip
        if name not in schemas:
            raise APIError.bad_request(
                f"tool_choice names {name!r}, which is not in tools", "tool_choice"
            )
        return ToolMode("named", name), schemas

    def _prepare(
        self, req: ChatCompletionRequest
    ) -> tuple[str, str, list[int], SamplingParams, ToolMode]:
        for name in UNSUPPORTED_CHAT_FIELDS:
            value = getattr(req, name)
            if value:
                raise APIError.bad_request(f"{name} is not supported by this server", name)
        mode, schemas = self._tool_mode(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError.bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
            raise APIError.bad_request(
                f"top_logprobs must be in [0, 20], got {req.top_logprobs}", "top_logprobs"
            )
        model = self.check_model(req.model)
        tools = req.tools if mode.kind != "none" else None
        text = self.render_prompt(req, tools)
        _, ids = self.tokenize_prompt(text, add_special_tokens=False)
        wanted = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        max_tokens = self.resolve_max_tokens(len(ids), wanted, "messages")
        kind = RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        try:
            params = req.sampling_params(max_tokens, logprobs, kind)
            if mode.kind in ("required", "named"):
                # A forced call: the output is the call itself, as JSON that must parse.
                if params.structured_outputs is not None:
                    raise ValueError(
                        f'tool_choice "{mode.kind}" cannot be combined with another output constraint'
                    )
                schema = (
                    schemas[mode.name]  # type: ignore[index]
                    if mode.kind == "named"
                    else required_schema(schemas, req.parallel_tool_calls is not False)
                )
                params.structured_outputs = StructuredOutputsParams(json=schema)
                params.structured_outputs.grammar_text()
        except ValueError as e:
            raise APIError.bad_request(str(e)) from None
        return model, text, ids, params, mode

    async def create(
        self, req: ChatCompletionRequest, request_id: str | None = None
    ) -> ChatCompletionResponse | AsyncGenerator[str, None]:
        model, text, ids, params, mode = self._prepare(req)
        request_id = request_id or f"chatcmpl-{random_uuid()}"
        prompt = {"prompt": text, "prompt_token_ids": ids, "cache_salt": req.cache_salt}
        lora = self.resolve_model(model)[1]
        (gen,) = self.admit([(prompt, params)], request_id, req.priority, lora)
        created = int(time.time())
        if req.stream:
            return self._stream(req, request_id, model, created, gen, mode)
        final = None
        try:
            async for out in gen:
                final = out
        except ValueError as e:
            raise APIError.bad_request(str(e)) from None
        assert final is not None
        choices = []
        for c in final.outputs:
            content, calls, finish = self._tool_calls(c.text, c.finish_reason, mode)
            choices.append(
                ChatChoice(
                    index=c.index,
                    message=ChatMessageOut(
                        content=content,
                        tool_calls=[_tool_call(call) for call in calls] if calls else None,
                    ),
                    logprobs=self._logprobs(c, req.top_logprobs or 0) if req.logprobs else None,
                    finish_reason=finish,
                    stop_reason=c.stop_reason,
                )
            )
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        return ChatCompletionResponse(
            id=request_id,
            created=created,
            model=model,
            choices=choices,
            usage=UsageInfo.of(
                len(final.prompt_token_ids), completion_tokens, final.num_cached_tokens
            ),
        )

    def _tool_calls(
        self, text: str, finish_reason: str | None, mode: ToolMode
    ) -> tuple[str | None, list[ParsedToolCall], str | None]:
        """(content, tool calls, finish reason) of a finished reply."""
        if mode.kind == "none" or finish_reason not in ("stop", None):
            return text, [], finish_reason  # cut short (length, abort): plain text
        try:
            if mode.kind == "named":
                assert mode.name is not None
                json.loads(text)
                return None, [ParsedToolCall(mode.name, text)], finish_reason
            if mode.kind == "required":
                return None, calls_from_required(text), "tool_calls"
        except ValueError:
            return text, [], finish_reason
        content, calls = self.tool_parser.extract(text)
        return content, calls, "tool_calls" if calls else finish_reason

    async def _stream(
        self,
        req: ChatCompletionRequest,
        request_id: str,
        model: str,
        created: int,
        gen: Any,
        mode: ToolMode,
    ) -> AsyncGenerator[str, None]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}

        def chunk(choice: ChatChunkChoice) -> str:
            return sse(
                ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice]),
                exclude,
            )

        # The role comes first, once per choice, as OpenAI sends it.
        for i in range(req.n):
            yield chunk(ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
        prompt_tokens = completion_tokens = cached = 0
        # With tools, text that may be (the start of) a call is held back per choice:
        # what was streamed as content, and what is kept until it is known.
        sent: dict[int, int] = {}
        held: dict[int, str] = {}
        try:
            async for out in gen:
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    text = c.text
                    if mode.kind != "none":
                        held[c.index] = held.get(c.index, "") + text
                        text = self._streamable(held[c.index], sent, c.index, mode)
                    if text or (c.token_ids and mode.kind == "none"):
                        yield chunk(
                            ChatChunkChoice(
                                index=c.index,
                                delta=DeltaMessage(content=text),
                                logprobs=self._logprobs(c, req.top_logprobs or 0)
                                if req.logprobs
                                else None,
                            )
                        )
                    if c.finish_reason is not None:
                        finish = c.finish_reason
                        if mode.kind != "none":
                            whole = held.get(c.index, "")
                            content, calls, finish = self._tool_calls(whole, c.finish_reason, mode)
                            rest = (content or "")[sent.get(c.index, 0) :] if not calls else ""
                            if calls:
                                before = (content or "")[sent.get(c.index, 0) :]
                                if before:
                                    yield chunk(
                                        ChatChunkChoice(
                                            index=c.index, delta=DeltaMessage(content=before)
                                        )
                                    )
                                for k, call in enumerate(calls):
                                    for delta in _tool_call_deltas(k, call):
                                        yield chunk(ChatChunkChoice(index=c.index, delta=delta))
                            elif rest:
                                yield chunk(
                                    ChatChunkChoice(index=c.index, delta=DeltaMessage(content=rest))
                                )
                        yield chunk(
                            ChatChunkChoice(
                                index=c.index,
                                delta=DeltaMessage(),
                                finish_reason=finish,
                                stop_reason=c.stop_reason,
                            )
                        )
                if out.finished:
                    prompt_tokens = len(out.prompt_token_ids)
                    cached = out.num_cached_tokens
            if include_usage:
                usage = UsageInfo.of(prompt_tokens, completion_tokens, cached)
                yield sse(
                    ChatCompletionChunk(
                        id=request_id, created=created, model=model, choices=[], usage=usage
                    )
                )
        except Exception as e:  # the stream still ends properly
            yield stream_error(e)
        yield SSE_DONE

    def _streamable(self, held: str, sent: dict[int, int], index: int, mode: ToolMode) -> str:
        """The new content that can be streamed now: none while a forced call is being
        written, and for auto all text up to where a call may begin."""
        if mode.kind in ("required", "named"):
            return ""
        start = self.tool_parser.call_started(held)
        limit = start if start is not None else self.tool_parser.safe_prefix(held)
        done = sent.get(index, 0)
        if limit <= done:
            return ""
        sent[index] = limit
        return held[done:limit]

    def _logprobs(self, comp: CompletionOutput, top: int) -> ChatLogprobs:
        content = []
        for tok, entry in zip(comp.token_ids, comp.logprobs or []):
            chosen = entry[tok]
            content.append(
                ChatTokenLogprob(
                    token=_text(chosen),
                    logprob=chosen.logprob,
                    bytes=list(_text(chosen).encode()),
                    top_logprobs=[
                        TopLogprob(
                            token=_text(lp), logprob=lp.logprob, bytes=list(_text(lp).encode())
                        )
                        for _, lp in self.top_entries(entry, top)
                    ],
                )
            )
        return ChatLogprobs(content=content)


def _text(lp: Logprob) -> str:
    return lp.decoded_token or ""


def _tool_call(call: ParsedToolCall) -> ToolCall:
    return ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def _tool_call_deltas(index: int, call: ParsedToolCall) -> list[DeltaMessage]:
    """OpenAI's way: the call's id, type and name first, then its arguments."""
    return [
        DeltaMessage(
            tool_calls=[
                DeltaToolCall(
                    index=index, id=call.id, type="function",
                    function=DeltaFunctionCall(name=call.name, arguments=""),
                )
            ]
        ),
        DeltaMessage(
            tool_calls=[DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=call.arguments))]
        ),
    ]  # fmt: skip
