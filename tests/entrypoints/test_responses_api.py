"""The Responses API (/v1/responses) as users drive it: the official `openai` client and
`openai-agents` against a real `pagellm serve` process, raw HTTP for bad input; and the
translation's event stream on a scripted chat reply (reasoning items, which the tiny
model never writes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import openai
import pytest

from pagellm.entrypoints.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    DeltaMessage,
    UsageInfo,
)
from pagellm.entrypoints.openai.protocol_responses import ResponsesRequest
from pagellm.entrypoints.openai.serving_base import APIError
from pagellm.entrypoints.openai.serving_responses import (
    OpenAIServingResponses,
    ResponseStore,
    StoredResponse,
    chat_messages,
)
from tests.conftest import API_KEY, MODEL
from tests.utils import RemoteServer

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather for a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def test_create_equals_chat_completion(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=MODEL,
        instructions="Answer briefly.",
        input="What is the capital of France?",
        max_output_tokens=12,
        temperature=0,
        metadata={"k": "v"},
    )
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        max_tokens=12,
        temperature=0,
    )
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text and r.output_text == chat.choices[0].message.content  # greedy parity
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    if r.status == "incomplete":
        assert r.incomplete_details is not None
        assert r.incomplete_details.reason == "max_output_tokens"
    (msg,) = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert r.usage is not None and chat.usage is not None
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "Answer briefly." and r.metadata == {"k": "v"}
    assert r.model == MODEL and r.max_output_tokens == 12


def test_stream_events_and_final_response(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, input="Say hello.", temperature=0)
    full = client.responses.create(**kwargs, max_output_tokens=24, extra_body={"stop": ["!"]})
    types, deltas, seqs = [], [], []
    with client.responses.stream(
        **kwargs, max_output_tokens=24, extra_body={"stop": ["!"]}
    ) as stream:
        for event in stream:
            types.append(event.type)
            seqs.append(event.sequence_number)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert seqs == list(range(len(seqs)))
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert final.status == "completed" and deltas
    assert "".join(deltas) == final.output_text == full.output_text
    assert final.usage is not None and final.usage.output_tokens == full.usage.output_tokens  # type: ignore[union-attr]
    assert client.responses.retrieve(final.id).output_text == final.output_text

    # Cut short by max_output_tokens: response.incomplete, as OpenAI ends such a stream.
    events = list(client.responses.create(**kwargs, max_output_tokens=4, stream=True))
    assert events[-1].type == "response.incomplete"
    last = events[-1].response  # type: ignore[union-attr]
    assert last.status == "incomplete" and last.usage.output_tokens == 4
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == last.output_text


def test_function_call_round_trip(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=24,
        temperature=0,
    )
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and r.status == "completed"
    call = calls[0]
    assert call.name == "get_weather" and call.id and call.id.startswith("fc_")
    args = json.loads(call.arguments)
    assert set(args) == {"city"} and isinstance(args["city"], str)

    reply = client.responses.create(
        model=MODEL,
        previous_response_id=r.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}],
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=16,
        temperature=0,
    )
    assert reply.previous_response_id == r.id
    assert reply.output[0].type == "message" and reply.output_text

    # The same conversation sent whole (no previous_response_id) gives the same reply.
    again = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=16,
        temperature=0,
        store=False,
    )
    assert again.output_text == reply.output_text


def test_streamed_function_call(client: openai.OpenAI) -> None:
    deltas, types = [], []
    with client.responses.stream(
        model=MODEL,
        input="What is the weather in Tokyo?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=24,
        temperature=0,
    ) as stream:
        for event in stream:
            types.append(event.type)
            if event.type == "response.function_call_arguments.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert types[2] == "response.output_item.added"
    assert "response.function_call_arguments.done" in types and types[-1] == "response.completed"
    (call,) = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert "".join(deltas) == call.arguments and set(json.loads(call.arguments)) == {"city"}


def test_store_retrieve_delete_and_404(server: RemoteServer, client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, input="Hi", max_output_tokens=4, temperature=0)
    stored = client.responses.create(**kwargs)
    got = client.responses.retrieve(stored.id)
    assert got.id == stored.id and got.output_text == stored.output_text
    raw = httpx.get(server.url(f"/v1/responses/{stored.id}"), headers=auth())
    assert raw.status_code == 200 and raw.json()["output"][0]["type"] == "message"

    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(**kwargs, previous_response_id="resp_does_not_exist")
    assert "resp_does_not_exist" in e.value.message
    assert e.value.body["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_does_not_exist")

    unstored = client.responses.create(**kwargs, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(**kwargs, previous_response_id=unstored.id)

    client.responses.delete(stored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(stored.id)


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"input": 5}, "input", "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input", "input_image"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input", "item_reference"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools", "web_search"),
        ({"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
         "tool_choice", "nope"),
        ({"input": "hi", "background": True}, "background", "background"),
        ({"input": "hi", "include": ["file_search_call.results"]}, "include", "file_search"),
        ({"input": "hi", "truncation": "auto"}, "truncation", "truncation"),
        ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text", "text.format"),
        ({"input": "hi", "temperature": "hot"}, "temperature", "temperature"),
        ({"input": "hi", "no_such_field": 1}, "no_such_field", "no_such_field"),
        ({}, "input", "input"),
    ],
)  # fmt: skip
def test_bad_input_gets_openai_errors(
    server: RemoteServer, body: dict[str, Any], param: str, needle: str
) -> None:
    r = httpx.post(server.url("/v1/responses"), json={"model": MODEL, **body}, headers=auth())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert needle in err["message"]


def test_structured_output_json_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model=MODEL,
        input="What is 2 + 2? Reply in JSON.",
        text={"format": {"type": "json_schema", "name": "sum", "schema": schema, "strict": True}},
        max_output_tokens=16,
        temperature=0,
    )
    assert r.status == "completed" and isinstance(json.loads(r.output_text)["answer"], int)
    assert r.text is not None and r.text.format is not None and r.text.format.type == "json_schema"


def test_openai_agents_on_responses_and_chat_models(server: RemoteServer) -> None:
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    called: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        called.append(city)
        return f"It is sunny in {city}."

    settings = agents.ModelSettings(tool_choice="required", max_tokens=24, temperature=0)

    def agent(model: Any) -> Any:
        return agents.Agent(
            name="weather",
            instructions="Use the tool to answer.",
            tools=[get_weather],
            model=model,
            model_settings=settings,
            tool_use_behavior="stop_on_first_tool",
        )

    async def main() -> None:
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
        for model in (
            agents.OpenAIResponsesModel(model=MODEL, openai_client=aclient),
            agents.OpenAIChatCompletionsModel(model=MODEL, openai_client=aclient),
        ):
            before = len(called)
            result = await agents.Runner.run(agent(model), "Weather in Paris?", max_turns=3)
            assert len(called) == before + 1, type(model).__name__
            assert result.final_output == f"It is sunny in {called[-1]}."

        streamed = agents.Runner.run_streamed(
            agent(agents.OpenAIResponsesModel(model=MODEL, openai_client=aclient)),
            "Weather in Rome?",
            max_turns=3,
        )
        seen = [
            event.item.type
            async for event in streamed.stream_events()
            if event.type == "run_item_stream_event"
        ]
        assert "tool_call_item" in seen and "tool_call_output_item" in seen
        assert streamed.final_output == f"It is sunny in {called[-1]}."
        await aclient.close()

    asyncio.run(main())


# --- the translation on a scripted chat reply (no server) -------------------------------


class ScriptedChat:
    """Stands in for OpenAIServingChat: one fixed reply, streamed or not."""

    def __init__(self, reasoning: str, content: str, finish: str = "stop") -> None:
        self.reasoning, self.content, self.finish = reasoning, content, finish
        self.seen: list[ChatCompletionRequest] = []

    def check_model(self, model: str | None) -> str:
        return "m"

    async def create(self, req: ChatCompletionRequest, request_id: str) -> ChatCompletionResponse:
        self.seen.append(req)
        message = ChatMessageOut(content=self.content, reasoning_content=self.reasoning)
        choice = ChatChoice(index=0, message=message, finish_reason=self.finish)
        return ChatCompletionResponse(model="m", choices=[choice], usage=UsageInfo.of(7, 5, 3))

    async def create_chunks(
        self, req: ChatCompletionRequest, request_id: str
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        self.seen.append(req)

        def chunk(delta: DeltaMessage, finish: str | None = None) -> ChatCompletionChunk:
            choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish)
            return ChatCompletionChunk(id=request_id, created=0, model="m", choices=[choice])

        async def gen() -> AsyncGenerator[ChatCompletionChunk, None]:
            yield chunk(DeltaMessage(role="assistant", content=""))
            for piece in (self.reasoning[:3], self.reasoning[3:]):
                yield chunk(DeltaMessage(reasoning_content=piece))
            for piece in (self.content[:2], self.content[2:]):
                yield chunk(DeltaMessage(content=piece))
            yield chunk(DeltaMessage(), self.finish)
            yield ChatCompletionChunk(
                id=request_id, created=0, model="m", choices=[], usage=UsageInfo.of(7, 5, 3)
            )

        return gen()


def test_reasoning_items_streamed_and_not() -> None:
    from openai.types.responses import Response

    chat = ScriptedChat("thinking hard", "The answer.")
    serving = OpenAIServingResponses(chat, store_size=1)  # type: ignore[arg-type]
    req = ResponsesRequest(input="q", instructions="sys")

    async def run() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        full = await serving.create(req)
        assert isinstance(full, dict)
        stream = await serving.create(req.model_copy(update={"stream": True}))
        assert not isinstance(stream, dict)
        events = []
        async for line in stream:
            name, data = line.strip().split("\n")
            event = json.loads(data.removeprefix("data: "))
            assert name == f"event: {event['type']}"
            events.append(event)
        return full, events

    full, events = asyncio.run(run())
    assert [m.role for m in chat.seen[0].messages] == ["system", "user"]
    response = Response.model_validate(full)
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == "thinking hard"  # type: ignore[union-attr,index]
    assert response.output_text == "The answer."
    assert response.usage is not None and response.usage.input_tokens_details.cached_tokens == 3
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = Response.model_validate(events[-1]["response"])
    assert [e["output_index"] for e in events[2:9]] == [0] * 7
    assert [e["output_index"] for e in events[9:16]] == [1] * 7
    assert final.output_text == "The answer." and final.output[0].type == "reasoning"
    # The store holds one: the streamed response evicted the first.
    assert len(serving.store) == 1
    with pytest.raises(APIError) as e:
        serving.store.get(full["id"])
    assert e.value.status == 404 and full["id"] in e.value.message
    assert serving.store.get(final.id).response["id"] == final.id


def test_input_items_become_chat_messages() -> None:
    items = [
        {"role": "developer", "content": [{"type": "input_text", "text": "be kind"}]},
        {"type": "message", "role": "user", "content": "weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
    ]  # fmt: skip
    messages = chat_messages(items, "top")
    assert [m["role"] for m in messages] == [
        "system",
        "system",
        "user",
        "assistant",
        "tool",
        "tool",
    ]
    assert messages[3]["content"] == "Let me check."
    assert [c["id"] for c in messages[3]["tool_calls"]] == ["c1", "c2"]
    assert messages[5] == {"role": "tool", "tool_call_id": "c2", "content": "two"}
    with pytest.raises(APIError, match=r"input\[0\]\.role"):
        chat_messages([{"role": "tool", "content": "x"}], None)
    store = ResponseStore(2)
    for i in range(3):
        store.put(StoredResponse({"id": f"r{i}", "output": []}, []))
    assert len(store) == 2
    with pytest.raises(APIError):
        store.get("r0")
