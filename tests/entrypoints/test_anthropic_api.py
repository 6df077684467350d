"""The Anthropic Messages API (/v1/messages, /v1/messages/count_tokens) as its users drive
it: a real `pagellm serve` process, the official `anthropic` client, raw HTTP for bad
input; plus the stream translation on its own for what a live server cannot provoke."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncGenerator
from typing import Any

import anthropic
import httpx
import pytest

from pagellm.entrypoints.anthropic.protocol import MessageParam
from pagellm.entrypoints.anthropic.serving_messages import (
    AnthropicServingMessages,
    chat_messages,
)
from pagellm.entrypoints.openai.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    DeltaMessage,
    UsageInfo,
)
from tests.conftest import API_KEY, MODEL
from tests.utils import RemoteServer

GREEDY = {"temperature": 0}
"""Sampling fields the current SDK no longer types are sent as extra body fields."""

SYSTEM = "You are a helpful assistant."
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> anthropic.Anthropic:
    # The SDK appends /v1/messages to the server root.
    return anthropic.Anthropic(base_url=server.url(""), api_key=API_KEY, max_retries=0)


def headers() -> dict[str, str]:
    return {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}


def raw_events(server: RemoteServer, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The (event name, data) pairs of a streamed reply, read as plain SSE."""
    events = []
    with httpx.stream(
        "POST", server.url("/v1/messages"), json={**body, "stream": True}, headers=headers()
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                assert name is not None
                data = json.loads(line[len("data: ") :])
                assert data["type"] == name
                events.append((name, data))
                name = None
    return events


def text_of(message: Any) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def test_create_text_usage_and_chat_parity(
    server: RemoteServer, client: anthropic.Anthropic
) -> None:
    msg = client.messages.create(
        model=MODEL, max_tokens=16, system=SYSTEM, messages=QUESTION, extra_body=GREEDY
    )
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL
    assert msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text.strip()
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.stop_sequence is None
    assert 0 < msg.usage.output_tokens <= 16
    assert msg.usage.cache_creation_input_tokens == 0
    # Greedy: the same conversation through chat completions gives the same reply.
    chat = httpx.post(
        server.url("/v1/chat/completions"),
        json={
            "model": MODEL,
            "messages": [{"role": "system", "content": SYSTEM}, *QUESTION],
            "max_tokens": 16,
            "temperature": 0,
        },
        headers={"Authorization": f"Bearer {API_KEY}"},
    ).json()
    choice = chat["choices"][0]
    assert choice["message"]["content"] == msg.content[0].text
    assert {"stop": "end_turn", "length": "max_tokens"}[choice["finish_reason"]] == msg.stop_reason
    usage = msg.usage
    assert chat["usage"]["prompt_tokens"] == usage.input_tokens + (
        usage.cache_read_input_tokens or 0
    )
    assert chat["usage"]["completion_tokens"] == usage.output_tokens


def test_stream_equals_create(server: RemoteServer, client: anthropic.Anthropic) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 16,
        "system": SYSTEM,
        "messages": QUESTION,
    }
    full = client.messages.create(**body, extra_body=GREEDY)
    with client.messages.stream(**body, extra_body=GREEDY) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text_of(final) == text_of(full)
    assert final.stop_reason == full.stop_reason
    assert final.usage.output_tokens == full.usage.output_tokens
    assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) == (
        full.usage.input_tokens + (full.usage.cache_read_input_tokens or 0)
    )

    events = raw_events(server, {**body, **GREEDY})
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert names[-2] == "message_delta"
    assert names[1:-2] == ["content_block_start"] + ["content_block_delta"] * (len(names) - 5) + [
        "content_block_stop"
    ]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] > 0
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"]["stop_reason"] == full.stop_reason
    assert delta["usage"]["output_tokens"] == full.usage.output_tokens
    texts = [d["delta"]["text"] for n, d in events if n == "content_block_delta"]
    assert "".join(texts) == text_of(full)


def test_tool_round_trip(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(
        model=MODEL,
        max_tokens=24,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "any"},
        messages=ASK_WEATHER,  # type: ignore[arg-type]
        extra_body=GREEDY,
    )
    assert msg.stop_reason == "tool_use"
    calls = [b for b in msg.content if b.type == "tool_use"]
    assert calls and calls[0].name == "get_weather"
    assert calls[0].id.startswith("toolu_")
    assert isinstance(calls[0].input, dict) and isinstance(calls[0].input["city"], str)
    assert set(calls[0].input) == {"city"}
    # The call and its result go back; the model answers in text.
    reply = client.messages.create(
        model=MODEL,
        max_tokens=16,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "none"},
        messages=[
            *ASK_WEATHER,  # type: ignore[list-item]
            msg.to_param(),
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": calls[0].id, "content": "Sunny, 22 C"}
                ],
            },
        ],
        extra_body=GREEDY,
    )
    assert reply.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in reply.content] == ["text"] and text_of(reply).strip()


def test_stream_named_tool(server: RemoteServer, client: anthropic.Anthropic) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 24,
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "messages": ASK_WEATHER,
    }
    with client.messages.stream(**body, extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    (call,) = [b for b in final.content if b.type == "tool_use"]
    assert call.name == "get_weather" and isinstance(call.input["city"], str)

    events = raw_events(server, {**body, **GREEDY})
    starts = [d for n, d in events if n == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["tool_use"]
    assert starts[0]["content_block"]["input"] == {}
    parts = [
        d["delta"]["partial_json"]
        for n, d in events
        if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta"
    ]
    assert json.loads("".join(parts)) == call.input


def test_stop_sequences(client: anthropic.Anthropic) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 16,
        "system": SYSTEM,
        "messages": QUESTION,
    }
    text = text_of(client.messages.create(**body, extra_body=GREEDY))
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    msg = client.messages.create(**body, stop_sequences=[stop], extra_body=GREEDY)
    assert msg.stop_reason == "stop_sequence"
    assert msg.stop_sequence == stop
    assert text_of(msg) == text[: text.index(stop)]


def test_structured_output_and_prefill(client: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    msg = client.messages.create(
        model=MODEL,
        max_tokens=24,
        messages=[{"role": "user", "content": "Is Paris in France? Answer in JSON."}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
        extra_body=GREEDY,
    )
    assert msg.stop_reason == "end_turn"
    assert isinstance(json.loads(text_of(msg))["ok"], bool)
    # A last assistant message is continued, not answered.
    msg = client.messages.create(
        model=MODEL,
        max_tokens=8,
        messages=[*QUESTION, {"role": "assistant", "content": "The capital of France is"}],  # type: ignore[list-item]
        extra_body=GREEDY,
    )
    assert "Paris" in text_of(msg)


def test_count_tokens_equals_usage(client: anthropic.Anthropic) -> None:
    for extra in (
        {"system": SYSTEM},
        {"tools": [WEATHER], "system": [{"type": "text", "text": SYSTEM}]},
    ):
        counted = client.messages.count_tokens(model=MODEL, messages=QUESTION, **extra)  # type: ignore[arg-type]
        msg = client.messages.create(
            model=MODEL,
            max_tokens=8,
            messages=QUESTION,
            extra_body=GREEDY,
            **extra,  # type: ignore[arg-type]
        )
        usage = msg.usage
        assert counted.input_tokens == usage.input_tokens + (usage.cache_read_input_tokens or 0)
    assert (
        counted.input_tokens
        > client.messages.count_tokens(model=MODEL, messages=QUESTION).input_tokens
    )  # type: ignore[arg-type]


def test_errors_sdk(server: RemoteServer, client: anthropic.Anthropic) -> None:
    def create(**kw: Any) -> Any:
        return client.messages.create(
            **{"model": MODEL, "max_tokens": 8, "messages": QUESTION, **kw}
        )

    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        create(extra_body={"max_tokens": "many"})  # typed as int: the SDK needs one
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        create(max_tokens=0)
    with pytest.raises(anthropic.BadRequestError, match="nope"):
        create(tools=[WEATHER], tool_choice={"type": "tool", "name": "nope"})
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
    }
    with pytest.raises(anthropic.BadRequestError, match="image") as e:
        create(
            messages=[{"role": "user", "content": [image, {"type": "text", "text": "Describe."}]}]
        )
    assert e.value.status_code == 400
    assert e.value.body["type"] == "error"  # type: ignore[index]
    assert e.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError, match="image"):
        client.messages.stream(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [image]}]
        ).__enter__()  # type: ignore[list-item]
    with pytest.raises(anthropic.NotFoundError):
        create(model="claude-nope")
    with pytest.raises(anthropic.BadRequestError, match="web_search"):
        create(tools=[{"type": "web_search_20250305", "name": "web_search"}])
    with pytest.raises(anthropic.BadRequestError, match="container"):
        create(extra_body={"container": "x"})
    bad = anthropic.Anthropic(base_url=server.url(""), api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model=MODEL, max_tokens=8, messages=QUESTION)  # type: ignore[arg-type]
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.count_tokens(model=MODEL, messages=QUESTION)  # type: ignore[arg-type]
    # Claude Code style: the key as a bearer token works too.
    bearer = anthropic.Anthropic(base_url=server.url(""), auth_token=API_KEY, max_retries=0)
    assert bearer.messages.count_tokens(model=MODEL, messages=QUESTION).input_tokens > 0  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "body", "status", "kind", "says"),
    [
        ("/v1/messages", {"model": MODEL, "messages": QUESTION}, 400, "invalid_request_error", "max_tokens"),
        ("/v1/messages", [1, 2], 400, "invalid_request_error", "object"),
        ("/v1/messages", "hello", 400, "invalid_request_error", "object"),
        ("/v1/messages", b"{not json", 400, "invalid_request_error", "JSON"),
        ("/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": "hi"}, 400, "invalid_request_error", "messages"),
        ("/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": QUESTION, "foo": 1}, 400, "invalid_request_error", "foo"),
        ("/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": [{"role": "system", "content": "x"}]}, 400, "invalid_request_error", "role"),
        ("/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}]}, 400, "invalid_request_error", "tool_use"),
        ("/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "document"}]}]}, 400, "invalid_request_error", "document"),
        ("/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": QUESTION, "stream": True, "temperature": "hot"}, 400, "invalid_request_error", "temperature"),
        ("/v1/messages", {"model": MODEL, "max_tokens": 100000, "messages": [{"role": "user", "content": "hi " * 2000}]}, 400, "invalid_request_error", "context length"),
        ("/v1/messages/count_tokens", {"model": MODEL, "messages": QUESTION, "max_tokens": 8}, 400, "invalid_request_error", "max_tokens"),
        ("/v1/messages/count_tokens", {"model": "nope", "messages": QUESTION}, 404, "not_found_error", "nope"),
    ],
)  # fmt: skip
def test_errors_raw(
    server: RemoteServer, path: str, body: Any, status: int, kind: str, says: str
) -> None:
    if isinstance(body, bytes):
        r = httpx.post(
            server.url(path),
            content=body,
            headers={**headers(), "content-type": "application/json"},
        )
    else:
        r = httpx.post(server.url(path), json=body, headers=headers())
    assert r.status_code == status, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == kind
    assert says in err["error"]["message"], err


def test_wrong_key_raw(server: RemoteServer) -> None:
    r = httpx.post(server.url("/v1/messages"), json={}, headers={"x-api-key": "nope"})
    assert r.status_code == 401
    assert r.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Incorrect or missing API key."},
    }


def _aborted(server: RemoteServer) -> float:
    text = httpx.get(server.url("/metrics")).text
    found = re.search(r'request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_stream_disconnect_aborts(server: RemoteServer) -> None:
    before = _aborted(server)
    body = {"model": MODEL, "max_tokens": 500, "stream": True, "messages": QUESTION}
    with httpx.stream("POST", server.url("/v1/messages"), json=body, headers=headers()) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 12:
                break  # leave after a few events
    deadline = time.monotonic() + 20
    while _aborted(server) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _aborted(server) == before + 1


# The translation on its own (no server).


def test_chat_messages_translation() -> None:
    messages = [
        MessageParam(role="user", content=[{"type": "text", "text": "Weather?"}]),
        MessageParam(
            role="assistant",
            content=[
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "w", "input": {"city": "Rome"}},
            ],
        ),
        MessageParam(
            role="user",
            content=[
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                 "content": [{"type": "text", "text": "No"}, {"type": "text", "text": "data"}]},
                {"type": "text", "text": "And now?", "cache_control": {"type": "ephemeral"}},
            ],
        ),
    ]  # fmt: skip
    assert chat_messages(messages, "Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "w", "arguments": '{"city": "Paris"}'}},
                {"id": "toolu_2", "type": "function",
                 "function": {"name": "w", "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "No\n\ndata"},
        {"role": "user", "content": "And now?"},
    ]  # fmt: skip


def _chunk(delta: DeltaMessage, finish: str | None = None) -> ChatCompletionChunk:
    choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish)
    return ChatCompletionChunk(id="c", created=0, model=MODEL, choices=[choice])


def _sse(events: list[str]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for e in events:
        head, data = e.strip().split("\n")
        out.append((head.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_stream_translation_blocks_and_mid_stream_error() -> None:
    closed = []

    async def chunks(fail: bool) -> AsyncGenerator[ChatCompletionChunk, None]:
        try:
            yield _chunk(DeltaMessage(role="assistant", content=""))
            yield _chunk(DeltaMessage(reasoning_content="Think."))
            yield _chunk(DeltaMessage(content="Hi"))
            if fail:
                raise ValueError("the engine refused it")
            yield _chunk(DeltaMessage(tool_calls=[{"index": 0, "id": "call_9", "type": "function",  # type: ignore[list-item]
                                                   "function": {"name": "w", "arguments": ""}}]))  # fmt: skip
            yield _chunk(
                DeltaMessage(tool_calls=[{"index": 0, "function": {"arguments": '{"a": 1}'}}])
            )  # type: ignore[list-item]
            yield _chunk(DeltaMessage(), finish="tool_calls")
            yield ChatCompletionChunk(
                id="c", created=0, model=MODEL, choices=[], usage=UsageInfo.of(10, 5, 4)
            )
        finally:
            closed.append(True)

    async def collect(fail: bool) -> list[str]:
        serving = AnthropicServingMessages(chat=None)  # type: ignore[arg-type]
        return [e async for e in serving._events(chunks(fail), "msg_1", MODEL, 10, False)]

    events = _sse(asyncio.run(collect(False)))
    assert [n for n, _ in events] == [
        "message_start", "ping",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    blocks = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in blocks] == ["thinking", "text", "tool_use"]
    assert blocks[2]["id"] == "toolu_9" and blocks[2]["name"] == "w"
    assert events[9][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"a": 1}'}
    assert events[11][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[11][1]["usage"] == {
        "input_tokens": 6,
        "output_tokens": 5,
        "cache_read_input_tokens": 4,
    }
    assert closed == [True]

    events = _sse(asyncio.run(collect(True)))
    assert events[-1] == (
        "error",
        {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "the engine refused it"},
        },
    )
    assert closed == [True, True]
