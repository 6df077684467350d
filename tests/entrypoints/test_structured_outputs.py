"""Structured outputs and tool calling through the server, with the official client, and
offline; parsers and bad constraints."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from pagellm import SamplingParams
from pagellm.benchmarks.schemas import SCHEMAS
from pagellm.entrypoints.openai.tool_calls import (
    HermesToolParser,
    Llama3JsonToolParser,
    required_schema,
)
from tests.conftest import API_KEY, MODEL
from tests.utils import RemoteServer


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY)


@pytest.fixture(scope="module")
def aclient(server: RemoteServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY)


class Person(BaseModel):
    name: str
    age: int
    city: str


def test_client_parse_returns_the_pydantic_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person who lives in Paris."}],
        response_format=Person,
        max_tokens=200,
        temperature=0,
    )
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person)
    assert person.name and isinstance(person.age, int)


def _stream_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_twenty_schemas_always_validate_streaming_and_not(aclient: openai.AsyncOpenAI) -> None:
    async def one(schema: dict[str, Any], stream: bool) -> tuple[str, str | None]:
        kwargs: dict[str, Any] = dict(
            model=MODEL,
            messages=[{"role": "user", "content": f"Reply with JSON for: {json.dumps(schema)}"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}},
            max_tokens=300,
            temperature=0.7,
            seed=1,
        )  # fmt: skip
        if not stream:
            r = await aclient.chat.completions.create(**kwargs)
            return r.choices[0].message.content or "", r.choices[0].finish_reason
        s = await aclient.chat.completions.create(**kwargs, stream=True)
        chunks = [c async for c in s]
        finish = next(c.choices[0].finish_reason for c in reversed(chunks) if c.choices)
        return _stream_text(chunks), finish

    async def run() -> list[tuple[str, str | None]]:
        jobs = [one(s, stream) for stream in (False, True) for s in SCHEMAS]
        return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    for (text, finish), schema in zip(results, SCHEMAS + SCHEMAS):
        assert finish == "stop", (text, schema)
        jsonschema.validate(json.loads(text), schema)


def test_regex_choice_and_grammar(client: openai.OpenAI) -> None:
    def ask(**extra: Any) -> str:
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Give me a phone number, then say yes or no."}],
            max_tokens=40,
            temperature=0.8,
            seed=3,
            extra_body=extra,
        )
        assert r.choices[0].finish_reason == "stop"
        return r.choices[0].message.content or ""

    import re

    assert re.fullmatch(r"\d{3}-\d{4}", ask(guided_regex=r"\d{3}-\d{4}"))
    assert ask(guided_choice=["yes", "no", "maybe"]) in ("yes", "no", "maybe")
    assert ask(structured_outputs={"choice": ["left", "right"]}) in ("left", "right")
    # A grammar that admits one string forces that string, GBNF and Lark alike.
    assert (
        ask(guided_grammar='root ::= "The password is swordfish."') == "The password is swordfish."
    )
    assert ask(structured_outputs={"grammar": 'start: "forty" " " "two"'}) == "forty two"
    assert ask(response_format={"type": "json_object"}).startswith("{")


def test_completions_accept_constraints_too(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="The answer is", max_tokens=10, extra_body={"guided_choice": ["A", "B"]}
    )
    assert r.choices[0].text in ("A", "B")


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 20}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_calls_have_valid_arguments(
    client: openai.OpenAI, choice: str, stream: bool
) -> None:
    tool_choice: Any = (
        "required"
        if choice == "required"
        else {"type": "function", "function": {"name": "get_weather"}}
    )
    kwargs: dict[str, Any] = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "What's the weather like in Paris?"}],
        tools=[WEATHER, TIME],
        tool_choice=tool_choice,
        max_tokens=200,
        temperature=0,
    )
    if stream:
        calls: dict[int, dict[str, Any]] = {}
        finish = None
        for c in client.chat.completions.create(**kwargs, stream=True):
            if not c.choices:
                continue
            delta = c.choices[0].delta
            assert not delta.content  # a forced call streams no content
            for tc in delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": None})
                entry["id"] = entry["id"] or tc.id
                entry["name"] += (tc.function.name or "") if tc.function else ""
                entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = c.choices[0].finish_reason or finish
        found = list(calls.values())
        assert all(e["id"] and e["id"].startswith("call_") for e in found)
    else:
        r = client.chat.completions.create(**kwargs)
        msg = r.choices[0].message
        finish = r.choices[0].finish_reason
        assert msg.content is None and msg.tool_calls
        found = [
            {"name": t.function.name, "arguments": t.function.arguments} for t in msg.tool_calls
        ]
    assert finish == ("stop" if choice == "named" else "tool_calls")
    assert found
    for call in found:
        if choice == "named":
            assert call["name"] == "get_weather"
        tool = WEATHER if call["name"] == "get_weather" else TIME
        jsonschema.validate(json.loads(call["arguments"]), tool["function"]["parameters"])


def test_tool_results_round_trip_through_the_template(
    server: RemoteServer, client: openai.OpenAI
) -> None:
    messages: list[Any] = [
        {"role": "user", "content": "What's the weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Oslo", "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 degrees and snowing"},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], max_tokens=30
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    tok = httpx.post(
        server.url("/tokenize"), headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL, "messages": messages},
    ).json()  # fmt: skip
    text = httpx.post(
        server.url("/detokenize"), headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL, "tokens": tok["tokens"]},
    ).json()["prompt"]  # fmt: skip
    assert "-3 degrees and snowing" in text


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, "response_format"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, "cannot be combined"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "match"), BAD)
def test_bad_constraints_are_400(server: RemoteServer, extra: dict[str, Any], match: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        **extra,
    }
    r = httpx.post(
        server.url("/v1/chat/completions"),
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]["message"] + str(r.json()["error"]["param"])


def test_offline_structured_outputs(smol_llm_default: Any) -> None:
    schema = SCHEMAS[0]
    out = smol_llm_default.generate(
        "Describe a person as JSON:",
        SamplingParams(max_tokens=100, temperature=0, structured_outputs={"json": schema}),
        use_tqdm=False,
    )[0].outputs[0]
    jsonschema.validate(json.loads(out.text), schema)
    with pytest.raises(ValueError, match="exactly one of"):
        SamplingParams(structured_outputs={"regex": "a", "choice": ["b"]})
    with pytest.raises(ValueError, match=r"invalid structured_outputs\.regex"):
        SamplingParams(structured_outputs={"regex": "a(b"})
    with pytest.raises(ValueError, match="use_beam_search"):
        SamplingParams(structured_outputs={"choice": ["a"]}, use_beam_search=True, n=1)


def test_n_samples_each_follow_the_constraint(smol_llm_default: Any) -> None:
    outs = smol_llm_default.generate(
        "Pick a colour:",
        SamplingParams(
            n=4,
            temperature=1.0,
            seed=5,
            max_tokens=10,
            structured_outputs={"choice": ["red", "green", "blue"]},
        ),
        use_tqdm=False,
    )[0].outputs
    assert len(outs) == 4 and all(o.text in ("red", "green", "blue") for o in outs)


def test_tool_parsers() -> None:
    hermes = HermesToolParser()
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"timezone": "CET"}}</tool_call>'
    content, calls = hermes.extract(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Rome"}), ("get_time", {"timezone": "CET"}),
    ]  # fmt: skip
    assert hermes.extract("no calls here") == ("no calls here", [])
    # Streaming holds back a tail that could still become "<tool_call>".
    assert hermes.safe_prefix("Sure <tool_") == len("Sure ")
    assert hermes.safe_prefix("a < b") == len("a < b")
    llama = Llama3JsonToolParser()
    content, calls = llama.extract(
        '<|python_tag|>{"name": "get_time", "parameters": {"timezone": "UTC"}}; {"name": "get_weather", "parameters": {"city": "Oslo"}}'
    )
    assert content is None and [c.name for c in calls] == ["get_time", "get_weather"]
    assert llama.extract("The weather is nice.") == ("The weather is nice.", [])
    schema = required_schema({"f": {"type": "object"}}, parallel=False)
    assert schema["maxItems"] == 1 and schema["minItems"] == 1


def test_xgrammar_backend_follows_every_kind_of_constraint() -> None:
    """The xgrammar backend (installed by `make setup`) on the real model: the 20 schemas,
    a regex, a choice and a GBNF grammar; a Lark grammar, which xgrammar cannot read, is
    still enforced (by llguidance)."""
    import re

    from pagellm import LLM
    from pagellm.core.structured_output import available_backends

    assert "xgrammar" in available_backends()
    llm = LLM(max_model_len=1024, kv_cache_memory="256MiB", structured_outputs_backend="xgrammar")
    assert llm.engine.core.structured.backend == "xgrammar"
    constraints: list[dict[str, Any]] = [{"json": s} for s in SCHEMAS] + [
        {"regex": r"[A-Z][a-z]{2,8} \d{2}"},
        {"choice": ["north", "south", "east", "west"]},
        {"grammar": 'root ::= "yes, " ("always" | "never")'},
        {"grammar": 'start: "forty" " " "two"'},
        {"json_object": True},
    ]
    prompts = [f"Answer with {json.dumps(c)[:200]}:" for c in constraints]
    params = [
        SamplingParams(max_tokens=300, temperature=0.7, seed=i, structured_outputs=c)
        for i, c in enumerate(constraints)
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    for out, schema in zip(outs[:20], SCHEMAS):
        assert out.outputs[0].finish_reason == "stop", (out.outputs[0].text, schema)
        jsonschema.validate(json.loads(out.outputs[0].text), schema)
    assert re.fullmatch(r"[A-Z][a-z]{2,8} \d{2}", texts[20])
    assert texts[21] in ("north", "south", "east", "west")
    assert texts[22] in ("yes, always", "yes, never")
    assert texts[23] == "forty two"
    assert isinstance(json.loads(texts[24]), dict)
