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
from pagellm.entrypoints.openai.reasoning import get_reasoning_parser
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


@dataclass
class PreparedChat:
    """A checked chat request, ready to admit: its prompt (text and token ids), sampling
    parameters and tool use."""

    model: str
    text: str
    ids: list[int]
    params: SamplingParams
    mode: ToolMode


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else []
    return "\n".join(str(x.get("text", "")) for x in parts if isinstance(x, dict))


def _policy_texts(req: ChatCompletionRequest) -> dict[str, str | None]:
    """What the serving policy reads besides the rendered prompt: the system prompt
    (prompt-leak check) and, for a single question (system + one user message, no
    tools), the text the semantic cache embeds; a conversation has none."""
    system = "\n".join(
        _text_of(m.content) for m in req.messages if m.role in ("system", "developer")
    )
    users = [m for m in req.messages if m.role == "user"]
    single = (
        len(users) == 1
        and not req.tools
        and all(m.role in ("system", "developer", "user") for m in req.messages)
    )
    semantic = f"{system}\n{_text_of(users[0].content)}".strip() if single else None
    return {"system": system or None, "semantic": semantic}


class OpenAIServingChat(OpenAIServing):
    def __init__(
        self,
        engine: Any,
        served_model_names: Any,
        tool_parser: str = "hermes",
        reasoning_parser: str | None = None,
    ) -> None:
        super().__init__(engine, served_model_names)
        self.tool_parser = get_tool_parser(tool_parser)
        self.reasoning_parser = get_reasoning_parser(reasoning_parser)

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

    def prepare(self, req: ChatCompletionRequest, clamp_max_tokens: bool = False) -> PreparedChat:
        """The request checked (APIError for a bad one), its prompt rendered and tokenized,
        its sampling parameters built. ``clamp_max_tokens``: a max_tokens larger than the
        room the prompt leaves is cut to that room instead of refused (the Anthropic
        Messages API's clients ask for more than small models have)."""
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
        if clamp_max_tokens and wanted is not None:
            wanted = min(wanted, max(1, self.max_model_len - len(ids)))
        max_tokens = self.resolve_max_tokens(len(ids), wanted, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        try:
            params = req.sampling_params(max_tokens, logprobs, RequestOutputKind.FINAL_ONLY)
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
                params.structured_outputs = StructuredOutputsParams(json=schema, strict=True)
                params.structured_outputs.grammar_text()
        except ValueError as e:
            raise APIError.bad_request(str(e)) from None
        return PreparedChat(model, text, ids, params, mode)

    async def create(
        self,
        req: ChatCompletionRequest,
        request_id: str | None = None,
        prepared: PreparedChat | None = None,
    ) -> ChatCompletionResponse | AsyncGenerator[str, None]:
        """The reply, or for ``stream`` the SSE lines of its chunks (ending with [DONE]).
        ``prepared``: what ``prepare(req)`` gave, when the caller needed it first."""
        if req.stream:
            return self._sse(req, await self.create_chunks(req, request_id, prepared))
        p = prepared or self.prepare(req)
        mode = p.mode
        request_id = request_id or f"chatcmpl-{random_uuid()}"
        gen, model = await self._admit(req, p, request_id)
        created = int(time.time())
        final = None
        try:
            async for out in gen:
                final = out
        except ValueError as e:
            raise APIError.bad_request(str(e)) from None
        assert final is not None
        choices = []
        for c in final.outputs:
            reasoning, answer = self._split_reasoning(c.text, True)
            content, calls, finish = self._tool_calls(answer, c.finish_reason, mode)
            choices.append(
                ChatChoice(
                    index=c.index,
                    message=ChatMessageOut(
                        content=content,
                        reasoning_content=reasoning or None,
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
                len(final.prompt_token_ids),
                completion_tokens,
                final.num_cached_tokens,
                final.extra.get("response_cache"),
            ),
        )

    async def create_chunks(
        self,
        req: ChatCompletionRequest,
        request_id: str | None = None,
        prepared: PreparedChat | None = None,
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        """A streamed reply as chunk objects (whatever ``req.stream`` says), for the SSE
        route and for the protocols translated from chat (Responses, Anthropic Messages).

        The request is checked and admitted before this returns (APIError for a bad one);
        errors met later are raised from the generator. The last chunk has no choices and
        carries the usage; closing the generator early aborts the request."""
        p = prepared or self.prepare(req)
        p.params.output_kind = RequestOutputKind.DELTA
        request_id = request_id or f"chatcmpl-{random_uuid()}"
        gen, model = await self._admit(req, p, request_id)
        return self._chunks(req, request_id, model, int(time.time()), gen, p.mode)

    async def _admit(
        self, req: ChatCompletionRequest, p: PreparedChat, request_id: str
    ) -> tuple[Any, str]:
        """The request's stream and the model name to report (a route's choice)."""
        prompt = {"prompt": p.text, "prompt_token_ids": p.ids, "cache_salt": req.cache_salt,
                  "policy": _policy_texts(req)}  # fmt: skip
        lora = self.resolve_model(p.model)[1]
        (gen,) = await self.admit([(prompt, p.params)], request_id, req.priority, lora)
        return gen, getattr(gen, "model", None) or p.model

    def _split_reasoning(self, text: str, final: bool) -> tuple[str, str]:
        if self.reasoning_parser is None:
            return "", text
        return self.reasoning_parser.split(text, final)

    def _tool_calls(
        self, text: str, finish_reason: str | None, mode: ToolMode
    ) -> tuple[str | None, list[ParsedToolCall], str | None]:
        """(content, tool calls, finish reason) of a finished reply."""
        if mode.kind == "none" or finish_reason not in ("stop", "length", None):
            return text, [], finish_reason  # aborted: plain text
        if mode.kind == "required":
            # Cut short, the calls written whole are kept; no whole call: plain text.
            calls = calls_from_required(text, complete=finish_reason != "length")
            return (None, calls, "tool_calls") if calls else (text, [], finish_reason)
        if finish_reason == "length":
            return text, [], finish_reason
        if mode.kind == "named":
            assert mode.name is not None
            try:
                json.loads(text)
            except ValueError:
                return text, [], finish_reason
            # OpenAI answers a named (forced) function with finish_reason "stop".
            return None, [ParsedToolCall(mode.name, text)], finish_reason
        content, calls = self.tool_parser.extract(text)
        return content, calls, "tool_calls" if calls else finish_reason

    async def _sse(
        self, req: ChatCompletionRequest, chunks: AsyncGenerator[ChatCompletionChunk, None]
    ) -> AsyncGenerator[str, None]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}
        try:
            async for chunk in chunks:
                if chunk.choices or include_usage:
                    yield sse(chunk, exclude)
        except Exception as e:  # the stream still ends properly
            yield stream_error(e)
        finally:
            await chunks.aclose()
        yield SSE_DONE

    async def _chunks(
        self,
        req: ChatCompletionRequest,
        request_id: str,
        model: str,
        created: int,
        gen: Any,
        mode: ToolMode,
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        def chunk(choice: ChatChunkChoice) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=request_id, created=created, model=model, choices=[choice]
            )

        # The role comes first, once per choice, as OpenAI sends it.
        for i in range(req.n):
            yield chunk(ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
        prompt_tokens = completion_tokens = cached = 0
        from_cache = None
        # Per choice: the raw text so far, and how much of its reasoning and of its
        # content has been sent. With tools, content that may be (the start of) a call is
        # held back until it is known.
        raw: dict[int, str] = {}
        sent_reasoning: dict[int, int] = {}
        sent: dict[int, int] = {}
        async for out in gen:
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                i = c.index
                raw[i] = raw.get(i, "") + c.text
                done = c.finish_reason is not None
                reasoning, answer = self._split_reasoning(raw[i], final=done)
                think = reasoning[sent_reasoning.get(i, 0) :]
                sent_reasoning[i] = len(reasoning)
                if mode.kind == "none":
                    text = answer[sent.get(i, 0) :]
                    sent[i] = len(answer)
                elif done:
                    text = ""  # the rest is sent below, once the calls are known
                else:
                    text = self._streamable(answer, sent, i, mode)
                if think or text or (c.token_ids and mode.kind == "none"):
                    yield chunk(
                        ChatChunkChoice(
                            index=i,
                            delta=DeltaMessage(
                                content=text if text or not think else None,
                                reasoning_content=think or None,
                            ),
                            logprobs=self._logprobs(c, req.top_logprobs or 0)
                            if req.logprobs
                            else None,
                        )
                    )
                if not done:
                    continue
                content, calls, finish = self._tool_calls(answer, c.finish_reason, mode)
                rest = (content or "")[sent.get(i, 0) :]
                if rest:
                    yield chunk(ChatChunkChoice(index=i, delta=DeltaMessage(content=rest)))
                for k, call in enumerate(calls):
                    for delta in _tool_call_deltas(k, call):
                        yield chunk(ChatChunkChoice(index=i, delta=delta))
                yield chunk(
                    ChatChunkChoice(
                        index=i,
                        delta=DeltaMessage(),
                        finish_reason=finish,
                        stop_reason=c.stop_reason,
                    )
                )
            if out.finished:
                prompt_tokens = len(out.prompt_token_ids)
                cached = out.num_cached_tokens
                from_cache = out.extra.get("response_cache")
        usage = UsageInfo.of(prompt_tokens, completion_tokens, cached, from_cache)
        yield ChatCompletionChunk(
            id=request_id, created=created, model=model, choices=[], usage=usage
        )

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
