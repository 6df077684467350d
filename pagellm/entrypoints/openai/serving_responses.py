"""POST /v1/responses, GET and DELETE /v1/responses/{id}: OpenAI's Responses API.

A Responses request is translated to a chat completion request and served by
``OpenAIServingChat`` (its chat template, tool calling, structured output and reasoning
split), and the chat reply is translated back: a reasoning item, a message item and
function_call items; streamed as the Responses API's named SSE events.

Stored responses (``store``, true by default as in OpenAI) live in a bounded in-memory
LRU of this process: ``previous_response_id`` prepends the stored conversation (the
input items that led to that response, then its output) to the new input. A restart or
an eviction forgets them (404 naming the id). Anything the translation cannot honour is
refused with a 400 that names the field.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pagellm.entrypoints.openai.protocol import ChatCompletionRequest, ChatCompletionResponse
from pagellm.entrypoints.openai.protocol_responses import ResponsesRequest
from pagellm.entrypoints.openai.serving_base import APIError, error_of
from pagellm.utils import random_uuid

if TYPE_CHECKING:
    from pagellm.entrypoints.openai.serving_chat import OpenAIServingChat


DEFAULT_STORE_SIZE = 1000
"""How many stored responses are kept (least recently used ones are evicted)."""

# Request fields pagellm does not implement: refused when set to anything but these.
_ALLOWED_VALUES: dict[str, tuple[Any, ...]] = {
    "background": (None, False),
    "top_logprobs": (None, 0),
    "max_tool_calls": (None,),
    "prompt": (None,),
    "conversation": (None,),
    "context_management": (None,),
    "prompt_cache_options": (None,),
    "truncation": (None, "disabled"),
}
_REASONS = {
    "background": "background responses are not supported; run the request in the foreground",
    "truncation": 'truncation "auto" is not supported; only "disabled"',
    "prompt": "stored prompt templates are not supported",
    "conversation": "conversations are not supported; chain responses with previous_response_id",
}
_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


def _bad(message: str, param: str | None) -> APIError:
    return APIError.bad_request(message, param)


def _id(prefix: str) -> str:
    return f"{prefix}_{random_uuid()}"


@dataclass
class StoredResponse:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]
    """The input items that led to the response (earlier turns included), in order."""


class ResponseStore:
    """A bounded LRU of stored responses, by id."""

    def __init__(self, max_size: int = DEFAULT_STORE_SIZE) -> None:
        if max_size < 1:
            raise ValueError(f"the response store needs room for at least one, got {max_size}")
        self.max_size = max_size
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, stored: StoredResponse) -> None:
        key = stored.response["id"]
        self._items[key] = stored
        self._items.move_to_end(key)
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        """The stored response (404 naming ``param``, the field that gave the id)."""
        stored = self._items.get(response_id)
        if stored is None:
            raise APIError(
                404,
                f"Response with id {response_id!r} not found: it was never stored (store: "
                "false), was evicted or deleted, or the server restarted.",
                "not_found_error",
                param,
            )
        self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self._items[response_id]


def _text_of(content: Any, param: str) -> str:
    """The text of a message's content: a string or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{param} must be a string or a list of content parts", "input")
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        key = "refusal" if kind == "refusal" else "text"
        if isinstance(part, dict) and (kind in _TEXT_PARTS or kind == "refusal"):
            if not isinstance(part.get(key), str):
                raise _bad(f"{param}[{j}].{key} must be a string", "input")
            texts.append(part[key])
        else:
            raise _bad(
                f"{param}[{j}] of type {kind!r} is not supported: text parts only "
                "(input_text, output_text)",
                "input",
            )
    return "".join(texts)


def input_items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's input as a list of items."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value)


def chat_messages(items: list[dict[str, Any]], instructions: str | None) -> list[dict[str, Any]]:
    """Responses input items as chat messages (400 naming the item for a bad one)."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{param} must be an object", "input")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _bad(
                    f"{param}.role must be user, system, developer or assistant, got {role!r}",
                    "input",
                )
            text = _text_of(item.get("content"), f"{param}.content")
            # Chat templates know system, not developer (OpenAI treats them alike).
            messages.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            call_id, name, args = item.get("call_id"), item.get("name"), item.get("arguments")
            if not (isinstance(call_id, str) and isinstance(name, str) and isinstance(args, str)):
                raise _bad(
                    f"{param} (function_call) needs string call_id, name and arguments", "input"
                )
            call = {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": args},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # parallel calls: one message
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise _bad(f"{param}.call_id must be a string", "input")
            text = _text_of(output, f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind == "reasoning":
            continue  # earlier reasoning is not shown to the model again
        else:
            raise _bad(
                f"{param} of type {kind!r} is not supported: messages, function_call, "
                "function_call_output and reasoning items only",
                "input",
            )
    if not messages:
        raise _bad("input must not be empty", "input")
    return messages


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise _bad(
                f"tools[{i}] of type {kind!r} is not supported: only function tools "
                "(built-in tools such as web_search or file_search are not available)",
                "tools",
            )
        if not isinstance(tool.get("name"), str):
            raise _bad(f"tools[{i}].name must be a string", "tools")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        extra = set(tool) - {"type", "name", "description", "parameters", "strict"}
        if extra:
            raise _bad(f"tools[{i}] has unsupported fields: {', '.join(sorted(extra))}", "tools")
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if not isinstance(name, str):
            raise _bad("tool_choice.name must be a string", "tool_choice")
        return {"type": "function", "function": {"name": name}}
    raise _bad(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}',
        "tool_choice",
    )


def chat_response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    if text is None:
        return None
    extra = set(text) - {"format", "verbosity"}
    if extra:
        raise _bad(f"text has unsupported fields: {', '.join(sorted(extra))}", "text")
    if text.get("verbosity") not in (None, "medium"):
        raise _bad("text.verbosity is not supported", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        assert isinstance(fmt, dict)
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("text.format.schema must be a JSON schema object", "text")
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise _bad('text.format.type must be "text", "json_object" or "json_schema"', "text")


def check_supported(req: ResponsesRequest) -> None:
    for name, allowed in _ALLOWED_VALUES.items():
        value = getattr(req, name)
        if value not in allowed:
            raise _bad(_REASONS.get(name, f"{name} is not supported by this server"), name)
    if req.include:
        raise _bad(
            f"include value(s) not supported: {', '.join(req.include)} (none are available)",
            "include",
        )
    if req.reasoning is not None:
        extra = set(req.reasoning) - {"effort", "summary", "generate_summary"}
        if extra:
            raise _bad(f"reasoning has unsupported fields: {', '.join(sorted(extra))}", "reasoning")
        if req.reasoning.get("summary") or req.reasoning.get("generate_summary"):
            raise _bad(
                "reasoning summaries are not supported; reasoning is returned as "
                "reasoning_text content (start the server with --reasoning-parser)",
                "reasoning",
            )


def usage_of(chat_usage: Any) -> dict[str, Any]:
    prompt = chat_usage.prompt_tokens if chat_usage else 0
    completion = chat_usage.completion_tokens if chat_usage else 0
    details = (chat_usage.prompt_tokens_details or {}) if chat_usage else {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": int(details.get("cached_tokens", 0)),
            "cache_write_tokens": 0,
        },
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": item_id,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "role": "assistant",
        "status": status,
        "content": [] if text is None else [_text_part(text)],
    }


def _call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


class OpenAIServingResponses:
    def __init__(self, chat: OpenAIServingChat, store_size: int = DEFAULT_STORE_SIZE) -> None:
        self.chat = chat
        self.store = ResponseStore(store_size)

    # --- request ---------------------------------------------------------------------

    def translate(
        self, req: ResponsesRequest
    ) -> tuple[ChatCompletionRequest, list[dict[str, Any]]]:
        """The chat request, and the full conversation (earlier turns first)."""
        check_supported(req)
        conversation: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            prev = self.store.get(req.previous_response_id, "previous_response_id")
            conversation = [*prev.conversation, *prev.response["output"]]
        conversation += input_items(req.input)
        fields: dict[str, Any] = {
            "model": req.model,
            "messages": chat_messages(conversation, req.instructions),
            "max_tokens": req.max_output_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "tools": chat_tools(req.tools),
            "tool_choice": chat_tool_choice(req.tool_choice),
            "parallel_tool_calls": req.parallel_tool_calls,
            "response_format": chat_response_format(req.text),
            "user": req.user,
            "seed": req.seed,
            "stop": req.stop,
            "top_k": req.top_k,
            "min_p": req.min_p,
            "repetition_penalty": req.repetition_penalty,
            "presence_penalty": req.presence_penalty,
            "frequency_penalty": req.frequency_penalty,
            "priority": req.priority,
            "cache_salt": req.cache_salt,
            "reasoning_effort": (req.reasoning or {}).get("effort"),
        }
        try:
            chat_req = ChatCompletionRequest.model_validate(
                {k: v for k, v in fields.items() if v is not None}
            )
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            raise _bad(f"{loc}: {first.get('msg', 'invalid value')}", None) from None
        return chat_req, conversation

    def _response(
        self,
        req: ResponsesRequest,
        response_id: str,
        created: int,
        model: str,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None,
    ) -> dict[str, Any]:
        reasoning = req.reasoning or {}
        return {
            "id": response_id,
            "object": "response",
            "created_at": created,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": None,
            "model": model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": reasoning.get("effort"), "summary": None},
            "service_tier": "default",
            "store": req.store,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
            "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [],
            "top_logprobs": 0,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": "disabled",
            "usage": usage,
            "user": req.user,
            "safety_identifier": req.safety_identifier,
            "prompt_cache_key": req.prompt_cache_key,
            "metadata": req.metadata or {},
        }

    def _keep(
        self, req: ResponsesRequest, response: dict[str, Any], conversation: list[dict[str, Any]]
    ) -> None:
        if req.store:
            self.store.put(StoredResponse(response, conversation))

    # --- serving ---------------------------------------------------------------------

    async def create(self, req: ResponsesRequest) -> dict[str, Any] | AsyncGenerator[str, None]:
        """The response object, or for ``stream`` its SSE events."""
        chat_req, conversation = self.translate(req)
        response_id = _id("resp")
        created = int(time.time())
        if req.stream:
            chunks = await self.chat.create_chunks(chat_req, response_id)
            return self._events(req, response_id, created, conversation, chunks)
        reply = await self.chat.create(chat_req, response_id)
        assert isinstance(reply, ChatCompletionResponse)
        choice = reply.choices[0]
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        msg = choice.message
        output: list[dict[str, Any]] = []
        if msg.reasoning_content:
            output.append(_reasoning_item(_id("rs"), msg.reasoning_content, status))
        if msg.content or not msg.tool_calls:
            output.append(_message_item(_id("msg"), msg.content or "", status))
        for call in msg.tool_calls or []:
            output.append(
                _call_item(
                    _id("fc"), call.id, call.function.name, call.function.arguments, "completed"
                )
            )
        response = self._response(
            req, response_id, created, reply.model, status, output, usage_of(reply.usage)
        )
        self._keep(req, response, conversation)
        return response

    async def _events(
        self,
        req: ResponsesRequest,
        response_id: str,
        created: int,
        conversation: list[dict[str, Any]],
        chunks: AsyncGenerator[Any, None],
    ) -> AsyncGenerator[str, None]:
        seq = 0

        def event(kind: str, **fields: Any) -> str:
            nonlocal seq
            data = {"type": kind, "sequence_number": seq, **fields}
            seq += 1
            return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

        model = self.chat.check_model(req.model)
        output: list[dict[str, Any]] = []  # finished items
        # The item being written: its kind ("reasoning", "message", "call"), id and text.
        current: dict[str, Any] | None = None
        finish: str | None = None
        usage: dict[str, Any] | None = None

        def close(status: str) -> list[str]:
            """Finish the open item: its done events."""
            nonlocal current
            if current is None:
                return []
            c, current = current, None
            index = len(output)
            out = []
            if c["kind"] == "reasoning":
                item = _reasoning_item(c["id"], c["text"], status)
                part = {"type": "reasoning_text", "text": c["text"]}
                out.append(event("response.reasoning_text.done", item_id=c["id"],
                                 output_index=index, content_index=0, text=c["text"]))  # fmt: skip
                out.append(event("response.content_part.done", item_id=c["id"],
                                 output_index=index, content_index=0, part=part))  # fmt: skip
            elif c["kind"] == "message":
                item = _message_item(c["id"], c["text"], status)
                out.append(event("response.output_text.done", item_id=c["id"],
                                 output_index=index, content_index=0, text=c["text"],
                                 logprobs=[]))  # fmt: skip
                out.append(event("response.content_part.done", item_id=c["id"],
                                 output_index=index, content_index=0,
                                 part=_text_part(c["text"])))  # fmt: skip
            else:
                item = _call_item(c["id"], c["call_id"], c["name"], c["text"], "completed")
                out.append(event("response.function_call_arguments.done", item_id=c["id"],
                                 output_index=index, arguments=c["text"]))  # fmt: skip
            out.append(event("response.output_item.done", output_index=index, item=item))
            output.append(item)
            return out

        def open_item(kind: str, **extra: Any) -> list[str]:
            nonlocal current
            prefix = {"reasoning": "rs", "message": "msg", "call": "fc"}[kind]
            current = {"kind": kind, "id": _id(prefix), "text": "", **extra}
            index = len(output)
            if kind == "reasoning":
                item = _reasoning_item(current["id"], "", "in_progress")
                item["content"] = []
                part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
            elif kind == "message":
                item = _message_item(current["id"], None, "in_progress")
                part = _text_part("")
            else:
                item = _call_item(current["id"], extra["call_id"], extra["name"], "", "in_progress")
                return [event("response.output_item.added", output_index=index, item=item)]
            return [
                event("response.output_item.added", output_index=index, item=item),
                event("response.content_part.added", item_id=current["id"], output_index=index,
                      content_index=0, part=part),
            ]  # fmt: skip

        def text_delta(kind: str, text: str) -> list[str]:
            out: list[str] = []
            if current is None or current["kind"] != kind:
                out += close("completed")
                out += open_item(kind)
            assert current is not None
            current["text"] += text
            name = (
                "response.reasoning_text.delta"
                if kind == "reasoning"
                else "response.output_text.delta"
            )
            fields: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
            out.append(event(name, item_id=current["id"], output_index=len(output),
                             content_index=0, delta=text, **fields))  # fmt: skip
            return out

        start = self._response(req, response_id, created, model, "in_progress", [], None)
        yield event("response.created", response=start)
        yield event("response.in_progress", response=start)
        try:
            async for chunk in chunks:
                if not chunk.choices:
                    usage = usage_of(chunk.usage)
                    continue
                choice = chunk.choices[0]
                delta = choice.delta
                if delta.reasoning_content:
                    for line in text_delta("reasoning", delta.reasoning_content):
                        yield line
                if delta.content:
                    for line in text_delta("message", delta.content):
                        yield line
                for call in delta.tool_calls or []:
                    fn = call.function
                    if call.id is not None:
                        for line in close("completed"):
                            yield line
                        name = fn.name if fn is not None and fn.name else ""
                        for line in open_item("call", call_id=call.id, name=name):
                            yield line
                    if fn is not None and fn.arguments and current is not None:
                        current["text"] += fn.arguments
                        yield event("response.function_call_arguments.delta", item_id=current["id"],
                                    output_index=len(output), delta=fn.arguments)  # fmt: skip
                if choice.finish_reason is not None:
                    finish = choice.finish_reason
        except Exception as e:
            for line in close("incomplete"):
                yield line
            err = error_of(e)
            failed = self._response(req, response_id, created, model, "failed", output, usage)
            failed["error"] = {
                "code": "server_error" if err.status >= 500 else "invalid_prompt",
                "message": err.message,
            }
            yield event("response.failed", response=failed)
            return
        finally:
            await chunks.aclose()
        status = "incomplete" if finish == "length" else "completed"
        for line in close(status):
            yield line
        if not output:  # nothing was generated: still one (empty) message
            for line in open_item("message"):
                yield line
            for line in close(status):
                yield line
        final = self._response(req, response_id, created, model, status, output, usage)
        self._keep(req, final, conversation)
        yield event(f"response.{status}", response=final)
