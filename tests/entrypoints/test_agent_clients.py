"""Clients as agents and frameworks drive the chat API: tool calls in every mode (openai,
langchain-openai, litellm), strict schemas, reasoning content, scoring with echo and
max_tokens=0, CORS. One real `pagellm serve` process (the shared `server` fixture)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from pagellm.core.structured_output import strict_schema
from pagellm.entrypoints.openai.reasoning import get_reasoning_parser
from tests.conftest import API_KEY, CORS_ORIGIN, MODEL
from tests.utils import RemoteServer

# A tool schema as clients write it: no additionalProperties.
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": WEATHER_PARAMS,
    },
}
ASK = [{"role": "user", "content": "What's the weather like in Paris?"}]


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


def _closed(args: str) -> dict[str, Any]:
    """The arguments, checked against the tool's schema with only its keys allowed."""
    value = json.loads(args)
    jsonschema.validate(value, {**WEATHER_PARAMS, "additionalProperties": False})
    return value


# ---- strict schemas -----------------------------------------------------------------


def test_strict_schema_closes_objects_that_list_properties() -> None:
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "object", "properties": {"a": {}}}},
            "open": {"type": "object", "properties": {"b": {}}, "additionalProperties": True},
            "any": {"type": "object"},
        },
        "$defs": {"d": {"properties": {"c": {}}}},
        "allOf": [{"properties": {"x": {}}}],
    }
    out = strict_schema(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["tags"]["items"]["additionalProperties"] is False
    assert out["properties"]["open"]["additionalProperties"] is True  # said: kept
    assert "additionalProperties" not in out["properties"]["any"]  # no list: any object
    assert out["$defs"]["d"]["additionalProperties"] is False
    assert "additionalProperties" not in out["allOf"][0]  # branches compose
    assert "additionalProperties" not in schema  # a copy


def test_strict_json_schema_allows_only_listed_keys(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
        "required": ["tags"],
    }  # fmt: skip

    def ask(strict: bool | None) -> Any:
        spec: dict[str, Any] = {"name": "tags", "schema": schema}
        if strict is not None:
            spec["strict"] = strict
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Give three tags for a blue sky photo."}],
            response_format={"type": "json_schema", "json_schema": spec},  # type: ignore[typeddict-item]
            max_tokens=60,
            temperature=0,
        )
        return r.choices[0]

    for strict in (True, None):
        choice = ask(strict)
        assert choice.finish_reason == "stop", choice
        assert set(json.loads(choice.message.content)) == {"tags"}
    lenient = ask(False)  # JSON Schema's own default: extra keys allowed, still JSON
    assert lenient.message.content.startswith("{")


# ---- tool calls in every mode ---------------------------------------------------------


def _stream_calls(client: openai.OpenAI, **kwargs: Any) -> tuple[str, list[dict[str, Any]], Any]:
    content, calls, finish = "", {}, None
    for c in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        if not c.choices:
            continue
        delta = c.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = entry["id"] or tc.id
            entry["name"] += (tc.function.name or "") if tc.function else ""
            entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = c.choices[0].finish_reason or finish
    return content, list(calls.values()), finish


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_calls_stream_without_max_tokens(client: openai.OpenAI, choice: str) -> None:
    """No max_tokens (the SDKs' default), a schema without additionalProperties: the
    call arrives as delta.tool_calls, with only the tool's keys, and the reply ends."""
    tool_choice: Any = (
        choice
        if choice == "required"
        else {"type": "function", "function": {"name": "get_weather"}}
    )
    content, calls, finish = _stream_calls(
        client, messages=ASK, tools=[WEATHER], tool_choice=tool_choice, temperature=0
    )
    assert content == ""
    assert calls and finish == ("tool_calls" if choice == "required" else "stop")
    assert len(calls) <= 2  # bounded, repeated calls given once
    for call in calls:
        assert call["id"].startswith("call_") and call["name"] == "get_weather"
        _closed(call["arguments"])


def test_parallel_tool_calls_false_gives_one_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, temperature=0,
    )  # fmt: skip
    calls = r.choices[0].message.tool_calls
    assert calls and len(calls) == 1 and r.choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_auto_answer_in_text(client: openai.OpenAI) -> None:
    for tool_choice in ("none", "auto"):
        content, calls, finish = _stream_calls(
            client, messages=[{"role": "user", "content": "Say hi."}], tools=[WEATHER],
            tool_choice=tool_choice, max_tokens=8, temperature=0,
        )  # fmt: skip
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hi."}], tools=[WEATHER],
            tool_choice=tool_choice, max_tokens=8, temperature=0,
        )  # type: ignore[call-overload]  # fmt: skip
        assert finish == r.choices[0].finish_reason
        if r.choices[0].message.tool_calls:  # auto may call: then the stream calls too
            assert [c["name"] for c in calls] == [
                t.function.name for t in r.choices[0].message.tool_calls
            ]
        else:
            assert content == r.choices[0].message.content and not calls


# ---- frameworks ---------------------------------------------------------------------


def test_langchain_openai(server: RemoteServer) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(
        model=MODEL, base_url=server.base_url, api_key=API_KEY, temperature=0,  # type: ignore[arg-type]
        max_tokens=24, max_retries=0,  # type: ignore[call-arg]
    )  # fmt: skip
    text = llm.invoke("Say hello.").content
    assert isinstance(text, str) and text
    assert "".join(str(c.content) for c in llm.stream("Say hello.")) == text

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"sunny in {city}"

    for tool_choice in ("required", "get_weather"):
        msg = llm.bind_tools([get_weather], tool_choice=tool_choice).invoke(
            "What's the weather like in Paris?"
        )
        assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather", msg
        assert set(msg.tool_calls[0]["args"]) == {"city"}
        assert get_weather.invoke(msg.tool_calls[0]["args"]).startswith("sunny")
    auto = llm.bind_tools([get_weather], tool_choice="auto").invoke("Say hello.")
    assert auto.content or auto.tool_calls

    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=150)

    person = llm.with_structured_output(Person).invoke("Invent a person.")
    assert isinstance(person, Person)


def test_litellm(server: RemoteServer) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    common: dict[str, Any] = dict(
        model=f"openai/{MODEL}", api_base=server.base_url, api_key=API_KEY, temperature=0,
        max_tokens=12,
    )  # fmt: skip
    r = litellm.completion(messages=[{"role": "user", "content": "Say hello."}], **common)
    text = r.choices[0].message.content
    assert text
    parts = litellm.completion(
        messages=[{"role": "user", "content": "Say hello."}], stream=True, **common
    )
    assert "".join(p.choices[0].delta.content or "" for p in parts) == text
    common["max_tokens"] = 60
    r = litellm.completion(messages=ASK, tools=[WEATHER], tool_choice="required", **common)
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    _closed(calls[0].function.arguments)


# ---- reasoning --------------------------------------------------------------------------


def test_reasoning_parser_splits_and_streams_monotonically() -> None:
    parser = get_reasoning_parser("qwen3")
    assert parser is not None
    text = "<think>\nplan it</think>\n\nHello world"
    assert parser.split(text) == ("plan it", "Hello world")
    assert parser.split("no tags") == ("", "no tags")
    seen = ("", "")
    for i in range(len(text) + 1):
        now = parser.split(text[:i], final=False)
        assert now[0].startswith(seen[0]) and now[1].startswith(seen[1])
        seen = now
    r1 = get_reasoning_parser("deepseek_r1")
    assert r1 is not None and r1.split("thinking</think>answer") == ("thinking", "answer")
    assert r1.split("still thinking") == ("still thinking", "")
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        get_reasoning_parser("nope")


def test_reasoning_content_in_chat(client: openai.OpenAI) -> None:
    """The server runs --reasoning-parser qwen3; a regex makes the model think first."""
    kwargs: dict[str, Any] = dict(
        model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=40,
        temperature=0, extra_body={"guided_regex": r"<think>[a-z ]{5,30}</think>[A-Za-z ]{3,30}"},
    )  # fmt: skip
    msg = client.chat.completions.create(**kwargs).choices[0].message
    reasoning = msg.reasoning_content  # type: ignore[attr-defined]
    assert reasoning and re.fullmatch(r"[a-z ]{5,30}", reasoning)
    assert msg.content and "<think>" not in msg.content and "</think>" not in msg.content
    streamed = {"reasoning_content": "", "content": ""}
    for c in client.chat.completions.create(stream=True, **kwargs):
        for key in streamed:
            streamed[key] += getattr(c.choices[0].delta, key, None) or "" if c.choices else ""
    assert streamed == {"reasoning_content": reasoning, "content": msg.content}


# ---- scoring: echo + logprobs + max_tokens=0 --------------------------------------------


def test_echo_with_max_tokens_zero_scores_the_prompt(client: openai.OpenAI) -> None:
    prompts: list[Any] = ["The capital of France is Paris.", ["Hello there.", "One two three."]]
    for prompt in [*prompts, [1, 504, 3460, 314, 4649]]:
        r = client.completions.create(
            model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0
        )
        texts = [prompt] if isinstance(prompt, str) else prompt
        assert r.usage is not None and r.usage.completion_tokens == 0
        for choice, want in zip(r.choices, texts):
            assert choice.finish_reason == "length"
            lp = choice.logprobs
            assert lp is not None and lp.token_logprobs and lp.token_logprobs[0] is None
            assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
            if isinstance(want, str):
                assert choice.text == want
            assert "".join(lp.tokens or []) == choice.text
        # The same scores as a one-token generation's prompt part.
        one = client.completions.create(
            model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0
        )
        for a, b in zip(r.choices, one.choices):
            n = len(a.logprobs.token_logprobs)  # type: ignore[union-attr,arg-type]
            assert b.logprobs.token_logprobs[:n] == pytest.approx(a.logprobs.token_logprobs)  # type: ignore[union-attr,index]
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=0)


# ---- CORS -----------------------------------------------------------------------------


def test_cors_allows_the_configured_origin_only(server: RemoteServer) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    r = httpx.options(
        server.url("/v1/chat/completions"), headers={"Origin": CORS_ORIGIN, **preflight}
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == CORS_ORIGIN
    r = httpx.options(
        server.url("/v1/chat/completions"), headers={"Origin": "http://evil.example", **preflight}
    )
    assert r.headers.get("access-control-allow-origin") is None
    # A streamed reply to the page carries the header; a 401 too (the page can read it).
    body = {"model": MODEL, "messages": ASK, "max_tokens": 2, "stream": True}
    ok = httpx.post(server.url("/v1/chat/completions"), json=body,
                    headers={"Origin": CORS_ORIGIN, "Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == CORS_ORIGIN
    bad = httpx.post(server.url("/v1/chat/completions"), json=body, headers={"Origin": CORS_ORIGIN})
    assert bad.status_code == 401 and bad.headers["access-control-allow-origin"] == CORS_ORIGIN
