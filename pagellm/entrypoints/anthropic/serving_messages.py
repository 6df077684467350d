"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API.

A Messages request is translated to a chat completion request and served by
``OpenAIServingChat`` (its chat template, tool calling, structured output for forced
tools, reasoning split), and the chat reply is translated back: a thinking block, a
text block and tool_use blocks; streamed as the Messages API's named SSE events
(message_start, ping, content_block_start/delta/stop, message_delta, message_stop, and
an ``error`` event for a failure met mid-stream).

The mapping, both ways:

    Anthropic                               chat
    system (string or text blocks)          a first system message
    user text blocks                        a user message
    user tool_result {tool_use_id, ...}     a tool message {tool_call_id, content}
    assistant text / tool_use {id, input}   an assistant message with tool_calls
                                            (arguments = json.dumps(input), same id)
    assistant thinking blocks               dropped (not shown to the model again)
    a last assistant message                continue_final_message (prefill)
    tools {name, description, input_schema} function tools {name, description, parameters}
    tool_choice auto / any / tool / none    "auto" / "required" / named / "none"
    disable_parallel_tool_use               parallel_tool_calls false (one call kept)
    stop_sequences, temperature, top_p, top_k  stop, temperature, top_p, top_k
    thinking enabled / disabled             chat_template_kwargs enable_thinking
    output_config.format (json_schema)      response_format json_schema (structured output)

A reply's tool call id ``call_X`` is reported as ``toolu_X``; ids coming back in the
history (tool_use.id, tool_result.tool_use_id) are passed to the chat template as they
are, so a tool_use and its tool_result always match.

``max_tokens`` larger than what the context window leaves is capped to what it leaves
(agent clients ask for 32k whatever the model), the reply then ending "max_tokens".
Usage follows Anthropic: ``input_tokens`` are the prompt tokens not read from the prefix
cache, ``cache_read_input_tokens`` the ones that were; their sum is what count_tokens
says for the same request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pagellm.entrypoints.anthropic.protocol import (
    CountTokensRequest,
    MessageParam,
    MessagesRequest,
)
from pagellm.entrypoints.openai.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    UsageInfo,
)
from pagellm.entrypoints.openai.serving_base import APIError, error_of
from pagellm.utils import random_uuid

if TYPE_CHECKING:
    from pagellm.entrypoints.openai.serving_chat import OpenAIServingChat

logger = logging.getLogger(__name__)

_BLOCK_JOIN = "\n\n"
"""Between consecutive text blocks of one message (and of the system prompt)."""

_SUPPORTED_BLOCKS = "text, tool_use, tool_result and thinking"


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError.bad_request(message, param)


def _unsupported(kind: Any, where: str) -> APIError:
    if kind in ("image", "document"):
        return _bad(
            f"{where}: {kind} content is not supported by this server: the served model "
            "reads text only; send text blocks",
            "messages",
        )
    return _bad(
        f"{where}: content blocks of type {kind!r} are not supported by this server "
        f"({_SUPPORTED_BLOCKS} only)",
        "messages",
    )


def _string(block: dict[str, Any], key: str, where: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise _bad(f"{where}.{key} must be a string", "messages")
    return value


def system_text(system: str | list[dict[str, Any]] | None) -> str | None:
    """The system prompt as one string (text blocks joined); None if there is none."""
    if system is None or isinstance(system, str):
        return system or None
    texts = []
    for i, block in enumerate(system):
        if block.get("type") != "text":
            raise _bad(
                f"system[{i}] must be a text block, got type {block.get('type')!r}", "system"
            )
        texts.append(_string(block, "text", f"system[{i}]"))
    return _BLOCK_JOIN.join(texts) or None


def _tool_result_text(block: dict[str, Any], where: str) -> str:
    content = block.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or a list of text blocks", "messages")
    texts = []
    for k, part in enumerate(content):
        at = f"{where}.content[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise _unsupported(kind, at)
        texts.append(_string(part, "text", at))
    return _BLOCK_JOIN.join(texts)


def _flush_user_text(out: list[dict[str, Any]], texts: list[str]) -> None:
    """The user's text blocks so far as one user message (tool results split them)."""
    if texts:
        out.append({"role": "user", "content": _BLOCK_JOIN.join(texts)})
        texts.clear()


def chat_messages(messages: list[MessageParam], system: str | None) -> list[dict[str, Any]]:
    """Anthropic messages as chat messages (400 naming the block for a bad one)."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": system})
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if isinstance(msg.content, str):
            out.append({"role": msg.role, "content": msg.content})
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []

        for j, block in enumerate(msg.content):
            at = f"{where}.content[{j}]"
            kind = block.get("type")
            if kind == "text":
                texts.append(_string(block, "text", at))
            elif kind in ("thinking", "redacted_thinking") and msg.role == "assistant":
                continue  # earlier reasoning is not shown to the model again
            elif kind == "tool_use" and msg.role == "assistant":
                call_id, name = _string(block, "id", at), _string(block, "name", at)
                args = block.get("input", {})
                if not isinstance(args, dict):
                    raise _bad(f"{at}.input must be an object", "messages")
                calls.append({
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
                })  # fmt: skip
            elif kind == "tool_result" and msg.role == "user":
                _flush_user_text(out, texts)
                out.append({
                    "role": "tool",
                    "tool_call_id": _string(block, "tool_use_id", at),
                    "content": _tool_result_text(block, at),
                })  # fmt: skip
            elif kind in ("tool_use", "tool_result", "thinking", "redacted_thinking"):
                raise _bad(f"{at}: a {kind} block cannot be in a {msg.role} message", "messages")
            else:
                raise _unsupported(kind, at)
        if msg.role == "user":
            _flush_user_text(out, texts)
        else:
            message: dict[str, Any] = {"role": "assistant", "content": _BLOCK_JOIN.join(texts)}
            if calls:
                message["tool_calls"] = calls
            out.append(message)
    return out


def _tools(req: CountTokensRequest) -> dict[str, Any]:
    """The chat request's tools, tool_choice and parallel_tool_calls fields."""
    fields: dict[str, Any] = {}
    if req.tools:
        tools = []
        for j, tool in enumerate(req.tools):
            if tool.type not in (None, "custom"):
                raise _bad(
                    f"tools[{j}]: server tools (type {tool.type!r}) are not supported by this "
                    "server; only client tools with name, description and input_schema",
                    "tools",
                )
            if tool.input_schema is None:
                raise _bad(f"tools[{j}].input_schema: Field required", "tools")
            fn: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
            if tool.description:
                fn["description"] = tool.description
            tools.append({"type": "function", "function": fn})
        fields["tools"] = tools
    choice = req.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise _bad(
                    'tool_choice.name is required for tool_choice type "tool"', "tool_choice"
                )
            fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use:
            fields["parallel_tool_calls"] = False
    return fields


def _tool_input(arguments: str) -> dict[str, Any]:
    """A chat tool call's arguments (JSON text) as a tool_use block's input object."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        value = None
    if not isinstance(value, dict):
        logger.warning("tool call arguments are not a JSON object: %.200s", arguments)
        return {}
    return value


def _toolu_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _stop_reason(
    finish_reason: str | None, stop_reason: int | str | None, has_calls: bool
) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a reply."""
    if has_calls:
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason == "stop" and isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return "end_turn", None


def _usage(usage: UsageInfo | None, prompt_tokens: int) -> dict[str, int]:
    total = usage.prompt_tokens if usage is not None else prompt_tokens
    cached = ((usage.prompt_tokens_details if usage else None) or {}).get("cached_tokens", 0)
    return {
        "input_tokens": total - cached,
        "output_tokens": usage.completion_tokens if usage is not None else 0,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, ensure_ascii=False)}\n\n"


class AnthropicServingMessages:
    """The Messages API over a chat serving object (which owns the engine client)."""

    def __init__(self, chat: OpenAIServingChat) -> None:
        self.chat = chat

    def chat_request(self, req: CountTokensRequest) -> ChatCompletionRequest:
        """The chat completion request that serves ``req`` (400 for what cannot be served)."""
        messages = chat_messages(req.messages, system_text(req.system))
        # A last assistant message is a prefill: the reply continues it.
        prefill = bool(req.messages) and req.messages[-1].role == "assistant"
        fields: dict[str, Any] = {
            "model": req.model,
            "messages": messages,
            "continue_final_message": prefill,
            "add_generation_prompt": not prefill,
            **_tools(req),
        }
        if req.thinking is not None:
            # Templates of hybrid reasoning models (Qwen3) read this; others ignore it.
            fields["chat_template_kwargs"] = {"enable_thinking": req.thinking.type != "disabled"}
        fmt = req.output_config.format if req.output_config is not None else None
        if fmt is not None:
            fields["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": fmt.schema_, "strict": True},
            }
        if isinstance(req, MessagesRequest):
            fields.update(
                max_tokens=req.max_tokens,
                stop=req.stop_sequences or None,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
            )
        try:
            return ChatCompletionRequest.model_validate(fields)
        except ValidationError as e:
            errors: list[Any] = e.errors()
            first: dict[str, Any] = dict(errors[0]) if errors else {}
            loc = ".".join(str(p) for p in first.get("loc", ()))
            raise _bad(f"{loc}: {first.get('msg', 'invalid value')}") from None

    def count_tokens(self, req: CountTokensRequest) -> dict[str, int]:
        """The prompt's token count as /v1/messages renders it (tools included unless
        tool_choice is "none"), after the same checks."""
        return {"input_tokens": len(self.chat.prepare(self.chat_request(req)).ids)}

    async def create(self, req: MessagesRequest) -> dict[str, Any] | AsyncGenerator[str, None]:
        """The reply message, or for ``stream`` its SSE events."""
        creq = self.chat_request(req)
        # Claude-style clients ask for more tokens than a small model's context has left.
        prepared = self.chat.prepare(creq, clamp_max_tokens=True)
        model, num_prompt = prepared.model, len(prepared.ids)
        single_call = bool(req.tool_choice and req.tool_choice.disable_parallel_tool_use)
        msg_id = f"msg_{random_uuid()}"
        if req.stream:
            chunks = await self.chat.create_chunks(creq, msg_id, prepared)
            return self._events(chunks, msg_id, model, num_prompt, single_call)
        resp = await self.chat.create(creq, msg_id, prepared)
        assert isinstance(resp, ChatCompletionResponse)
        return self._message(resp, msg_id, model, num_prompt, single_call)

    def _message(
        self,
        resp: ChatCompletionResponse,
        msg_id: str,
        model: str,
        num_prompt: int,
        single_call: bool,
    ) -> dict[str, Any]:
        choice = resp.choices[0]
        out = choice.message
        content: list[dict[str, Any]] = []
        if out.reasoning_content:
            content.append({"type": "thinking", "thinking": out.reasoning_content, "signature": ""})
        if out.content:
            content.append({"type": "text", "text": out.content})
        calls = (out.tool_calls or [])[: 1 if single_call else None]
        for call in calls:
            content.append({
                "type": "tool_use",
                "id": _toolu_id(call.id),
                "name": call.function.name,
                "input": _tool_input(call.function.arguments),
            })  # fmt: skip
        stop_reason, stop_sequence = _stop_reason(
            choice.finish_reason, choice.stop_reason, bool(calls)
        )
        return {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": _usage(resp.usage, num_prompt),
        }

    async def _events(
        self,
        chunks: AsyncGenerator[ChatCompletionChunk, None],
        msg_id: str,
        model: str,
        num_prompt: int,
        single_call: bool,
    ) -> AsyncGenerator[str, None]:
        """The SSE events of a streamed reply. Blocks open in the order their first delta
        arrives; a tool call's input is sent as one input_json_delta when it is whole."""
        start: dict[str, Any] = {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _usage(None, num_prompt),
        }
        yield _event("message_start", {"message": start})
        yield _event("ping", {})
        index = -1
        kind: str | None = None  # the open block's type
        arguments = ""  # the open tool_use block's arguments so far
        has_calls = False
        finish: tuple[str | None, int | str | None] = (None, None)
        usage: UsageInfo | None = None

        def close() -> list[str]:
            nonlocal kind, arguments
            events = []
            if kind == "tool_use":
                partial = json.dumps(_tool_input(arguments), ensure_ascii=False)
                events.append(
                    _event("content_block_delta", {
                        "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": partial},
                    })
                )  # fmt: skip
            if kind is not None:
                events.append(_event("content_block_stop", {"index": index}))
            kind, arguments = None, ""
            return events

        def open_block(block: dict[str, Any]) -> list[str]:
            nonlocal index, kind
            events = close()
            index += 1
            kind = block["type"]
            events.append(_event("content_block_start", {"index": index, "content_block": block}))
            return events

        try:
            async for chunk in chunks:
                if not chunk.choices and chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    delta = choice.delta
                    if delta.reasoning_content:
                        if kind != "thinking":
                            for ev in open_block(
                                {"type": "thinking", "thinking": "", "signature": ""}
                            ):
                                yield ev
                        yield _event("content_block_delta", {
                            "index": index,
                            "delta": {"type": "thinking_delta", "thinking": delta.reasoning_content},
                        })  # fmt: skip
                    if delta.content:
                        if kind != "text":
                            for ev in open_block({"type": "text", "text": ""}):
                                yield ev
                        yield _event("content_block_delta", {
                            "index": index, "delta": {"type": "text_delta", "text": delta.content}
                        })  # fmt: skip
                    for call in delta.tool_calls or []:
                        if single_call and call.index > 0:
                            continue
                        fn = call.function
                        if call.id is not None:
                            has_calls = True
                            block: dict[str, Any] = {
                                "type": "tool_use",
                                "id": _toolu_id(call.id),
                                "name": fn.name if fn is not None else "",
                                "input": {},
                            }
                            for ev in open_block(block):
                                yield ev
                        if kind == "tool_use" and fn is not None and fn.arguments:
                            arguments += fn.arguments
                    if choice.finish_reason is not None:
                        finish = (choice.finish_reason, choice.stop_reason)
        except Exception as e:  # the stream ends with an error event, as Anthropic's does
            yield f"event: error\ndata: {json.dumps(error_of(e).anthropic_body())}\n\n"
            return
        finally:
            await chunks.aclose()
        for ev in close():
            yield ev
        stop_reason, stop_sequence = _stop_reason(*finish, has_calls)
        final_usage = _usage(usage, num_prompt)
        del final_usage["cache_creation_input_tokens"]
        yield _event("message_delta", {
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": final_usage,
        })  # fmt: skip
        yield _event("message_stop", {})
