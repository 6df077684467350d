"""The OpenAI-compatible server as users drive it: a real `pagellm serve` process, the
official `openai` client (sync and async), raw HTTP for bad input."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagellm import SamplingParams
from tests.conftest import API_KEY, MODEL
from tests.conftest import SERVER_ARGS as COMMON
from tests.utils import RemoteServer


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


@pytest.fixture
def aclient(server: RemoteServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def metrics(server: RemoteServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(server.url("/metrics")).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(m: dict[Any, float], name: str, **labels: str) -> float:
    want = {("model_name", MODEL), *labels.items()}
    return sum(v for (n, lab), v in m.items() if n == name and want <= set(lab))


def test_models_health_version(server: RemoteServer, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.get(server.url("/version")).json()["version"]


def test_completion_stream_equals_non_stream(server: RemoteServer, client: openai.OpenAI) -> None:
    prompt = "The three primary colors are"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    choice = full.choices[0]
    assert full.object == "text_completion" and full.id.startswith("cmpl-") and full.model == MODEL
    assert choice.finish_reason == "length"
    tokens = httpx.post(server.url("/tokenize"), json={"prompt": prompt}, headers=auth()).json()
    assert full.usage is not None
    assert full.usage.prompt_tokens == tokens["count"]
    assert full.usage.completion_tokens == 20
    assert full.usage.total_tokens == tokens["count"] + 20
    pieces, finish, usage = [], None, None
    stream = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.text)
            finish = c.finish_reason or finish
    assert "".join(pieces) == choice.text
    assert finish == "length"
    assert (
        usage is not None
        and usage.completion_tokens == 20
        and usage.prompt_tokens == tokens["count"]
    )


def test_chat_stream_equals_non_stream_and_sse_format(
    server: RemoteServer, client: openai.OpenAI
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a fruit."},
    ]
    full = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0
    )
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert full.choices[0].message.role == "assistant"
    text = full.choices[0].message.content
    assert text
    with httpx.stream(
        "POST",
        server.url("/v1/chat/completions"),
        headers=auth(),
        json={
            "model": MODEL,
            "messages": messages,
            "max_tokens": 24,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content_chunks = [c for c in chunks if c["choices"]]
    assert content_chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert content_chunks[-1]["choices"][0]["delta"] == {}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in content_chunks) == text
    usage = chunks[-1]["usage"]
    assert (
        chunks[-1]["choices"] == [] and usage["completion_tokens"] == full.usage.completion_tokens
    )
    assert usage["prompt_tokens"] == full.usage.prompt_tokens


def test_n_stop_seed_and_logprobs(client: openai.OpenAI) -> None:
    prompt = "List some animals: cat, dog,"
    many = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, n=3, temperature=1.0, seed=11
    )
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    again = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, n=3, temperature=1.0, seed=11
    )
    assert [c.text for c in many.choices] == [c.text for c in again.choices]
    assert many.usage is not None and many.usage.completion_tokens == 30
    base = (
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    stop = base.strip().split()[1][:2]
    stopped = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == base[: base.index(stop)]
    lp = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=3
    )
    logprobs = lp.choices[0].logprobs
    assert (
        logprobs is not None
        and len(logprobs.tokens) == 5
        and "".join(logprobs.tokens) == lp.choices[0].text
    )
    for val, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(val)  # greedy: the top token
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(
        len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        for t in content
    )


def test_32_concurrent_streams_equal_offline_greedy(
    server: RemoteServer, aclient: openai.AsyncOpenAI, smol_llm_default: Any
) -> None:
    """Batched under load or alone, a request's greedy output is the same: the quantized
    kernels are batch invariant (served and offline run the same defaults)."""
    prompts = [f"Write one sentence about the number {i}." for i in range(32)]
    expected = [
        o.outputs[0].text
        for o in smol_llm_default.chat(
            [[{"role": "user", "content": p}] for p in prompts],
            SamplingParams(temperature=0, max_tokens=24),
            use_tqdm=False,
        )
    ]

    async def one(p: str) -> str:
        stream = await aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": p}],
            max_tokens=24,
            temperature=0,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all_of_them() -> list[str]:
        return await asyncio.gather(*(one(p) for p in prompts))

    got = asyncio.run(all_of_them())
    assert got == expected


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, "Invalid JSON"),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "messages.0.role",
    ),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n must be"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "max_tokens": 5000},
        400,
        "maximum context length is 1024",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "word " * 1100},
        400,
        "1024 tokens, but the prompt has 1101",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "suffix": "x"},
        400,
        "suffix is not supported",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "n": 3, "best_of": 2},
        400,
        "best_of must be an integer of at least n",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "use_beam_search": True, "top_p": 0.5},
        400,
        "top_p is not supported with use_beam_search",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "frobnicate": 1},
        400,
        "Unrecognized request argument supplied: frobnicate",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": [], "max_tokens": 2},
        400,
        "prompt must not be empty",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, 99999999]]}, 400, "out of range"),
    (
        "/v1/completions",
        {"model": "gpt-4", "prompt": "hi"},
        404,
        "The model `gpt-4` does not exist",
    ),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages must not be empty"),
    (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function"}],
        },
        400,
        "tools[0] must be {'type': 'function', 'function'",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "top_logprobs requires logprobs",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "image_url",
    ),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400, "messages"),
    ("/v1/nothing-here", {}, 404, "Not Found"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_REQUESTS)
def test_bad_input_gets_openai_errors(
    server: RemoteServer, path: str, body: Any, status: int, message: str
) -> None:
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    resp = httpx.post(
        server.url(path),
        headers={**auth(), "Content-Type": "application/json"},
        timeout=60,
        **kwargs,
    )
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert message in err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in resp.text


def test_bad_requests_do_not_disturb_a_running_stream(
    server: RemoteServer, aclient: openai.AsyncOpenAI, client: openai.OpenAI
) -> None:
    expected = (
        client.completions.create(
            model=MODEL, prompt="Tell me about the sea", max_tokens=40, temperature=0
        )
        .choices[0]
        .text
    )

    async def run() -> str:
        stream = await aclient.completions.create(
            model=MODEL, prompt="Tell me about the sea", max_tokens=40, temperature=0, stream=True
        )
        async with httpx.AsyncClient(headers=auth(), timeout=60) as http:
            bad = [
                http.post(
                    server.url("/v1/completions"),
                    json={"model": MODEL, "prompt": "x", "temperature": -3},
                )
                for _ in range(10)
            ]
            results = await asyncio.gather(*bad)
            assert all(r.status_code == 400 for r in results)
        return "".join([c.choices[0].text async for c in stream])

    assert asyncio.run(run()) == expected


def test_auth_is_required(server: RemoteServer) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert httpx.post(server.url("/v1/completions"), json=body).status_code == 401
    wrong = httpx.post(
        server.url("/v1/completions"), json=body, headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url("/v1/models")).status_code == 401
    assert httpx.post(server.url("/v1/completions"), json=body, headers=auth()).status_code == 200
    # Probes stay open.
    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.get(server.url("/metrics")).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()


def test_tokenize_detokenize_and_legacy_generate(server: RemoteServer) -> None:
    tok = httpx.post(server.url("/tokenize"), json={"prompt": "Hello world"}, headers=auth()).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 1024
    text = httpx.post(
        server.url("/detokenize"), json={"tokens": tok["tokens"]}, headers=auth()
    ).json()["prompt"]
    assert text == "Hello world"
    chat_tok = httpx.post(
        server.url("/tokenize"),
        json={"messages": [{"role": "user", "content": "Hi"}]},
        headers=auth(),
    ).json()
    assert chat_tok["count"] > 5
    # The seeds' curl example: no Content-Type header, JSON body.
    resp = httpx.post(
        server.url("/generate"),
        content=b'{"prompt": "Funniest joke ever:", "n": 1, "temperature": 0.95, "max_tokens": 20}',
        headers={**auth(), "Content-Type": "application/x-www-form-urlencoded"},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    texts = resp.json()["text"]
    assert len(texts) == 1 and texts[0].startswith("Funniest joke ever:")
    bad = httpx.post(
        server.url("/generate"), json={"prompt": "x", "temperature": -1}, headers=auth()
    )
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]


def _wait_until_idle(server: RemoteServer, timeout: float = 20) -> dict[Any, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if (
            metric(m, "pagellm:num_requests_running") == 0
            and metric(m, "pagellm:kv_cache_usage_perc") == 0
        ):
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.1)


def test_client_disconnect_aborts_and_frees_blocks(server: RemoteServer) -> None:
    _wait_until_idle(server)
    before = metrics(server)
    body = {
        "model": MODEL,
        "prompt": "Count to one thousand:",
        "max_tokens": 900,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", server.url("/v1/completions"), json=body, headers=auth(), timeout=60
    ) as resp:
        seen = 0
        # Keep the line iterator referenced: a generator dropped by `break` is closed at
        # once, and httpx then closes the connection (a disconnect before we look).
        lines = resp.iter_lines()
        for line in lines:
            seen += line.startswith("data: ")
            if seen >= 3:
                break
        m = metrics(server)
        assert metric(m, "pagellm:num_requests_running") == 1
        assert metric(m, "pagellm:kv_cache_usage_perc") > 0
    # Connection closed mid-stream: the request is aborted, its blocks freed.
    after = _wait_until_idle(server)
    aborted = metric(after, "pagellm:request_success_total", finished_reason="abort")
    assert aborted == metric(before, "pagellm:request_success_total", finished_reason="abort") + 1
    # A non-streaming request whose client gives up is aborted too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url("/v1/completions"),
            json={**body, "stream": False},
            headers=auth(),
            timeout=1.5,
        )
    after = _wait_until_idle(server)
    assert metric(after, "pagellm:request_success_total", finished_reason="abort") == aborted + 1


def test_metrics_count_what_was_served(server: RemoteServer, client: openai.OpenAI) -> None:
    _wait_until_idle(server)
    before = metrics(server)
    usages = []
    for i in range(3):
        r = client.completions.create(
            model=MODEL,
            prompt=f"Item {i}:",
            max_tokens=7,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        usages.append(r.usage)
    after = _wait_until_idle(server)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("pagellm:request_success_total", finished_reason="length") == 3
    assert (
        delta("pagellm:generation_tokens_total") == sum(u.completion_tokens for u in usages) == 21
    )
    assert delta("pagellm:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("pagellm:time_to_first_token_seconds_count") == 3
    assert delta("pagellm:e2e_request_latency_seconds_count") == 3
    assert delta("pagellm:inter_token_latency_seconds_count") == 3 * 6
    assert delta("pagellm:request_time_per_output_token_seconds_count") == 3
    for name in (
        "pagellm:request_queue_time_seconds_count",
        "pagellm:request_prefill_time_seconds_count",
    ):
        assert delta(name) == 3
    assert ("pagellm:num_requests_waiting", (("engine", "0"), ("model_name", MODEL))) in after


def test_queue_limit_auth_off_and_graceful_shutdown() -> None:
    srv = RemoteServer([*COMMON, "--max-num-seqs", "1", "--max-queued-requests", "1"])
    try:
        # No --api-key: no key needed.
        assert httpx.get(srv.url("/v1/models")).status_code == 200
        body = {
            "model": MODEL,
            "prompt": "Tell a long story:",
            "max_tokens": 300,
            "ignore_eos": True,
        }

        async def burst() -> tuple[httpx.Response, list[httpx.Response]]:
            async with httpx.AsyncClient(timeout=120) as http:
                first = asyncio.ensure_future(http.post(srv.url("/v1/completions"), json=body))
                while metric(metrics(srv), "pagellm:num_requests_running") < 1:
                    await asyncio.sleep(0.05)
                # One request runs (max_num_seqs 1), one may wait, the rest are refused.
                second = asyncio.ensure_future(
                    http.post(srv.url("/v1/completions"), json={**body, "max_tokens": 5})
                )
                while metric(metrics(srv), "pagellm:num_requests_waiting") < 1:
                    await asyncio.sleep(0.05)
                rest = await asyncio.gather(
                    *(http.post(srv.url("/v1/completions"), json=body) for _ in range(3))
                )
                return await first, [await second, *rest]

        first, results = asyncio.run(burst())
        assert first.status_code == 200
        codes = [r.status_code for r in results]
        assert codes == [200, 429, 429, 429], codes
        refused = results[1]
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        # SIGTERM with a request in flight: the server exits 0 in bounded time.
        with httpx.stream(
            "POST", srv.url("/v1/completions"), json={**body, "stream": True}, timeout=60
        ) as resp:
            next(resp.iter_lines())
            started = time.monotonic()
            assert srv.stop(timeout=40) == 0
            assert time.monotonic() - started < 30
    finally:
        srv.stop()


def test_echo_and_multiple_prompts(client: openai.OpenAI) -> None:
    resp = client.completions.create(
        model=MODEL,
        prompt=["One, two,", "Red, green,"],
        max_tokens=4,
        temperature=0,
        echo=True,
        logprobs=1,
    )
    assert [c.index for c in resp.choices] == [0, 1]
    solo = client.completions.create(model=MODEL, prompt="Red, green,", max_tokens=4, temperature=0)
    assert resp.choices[1].text == "Red, green," + solo.choices[0].text
    lp = resp.choices[1].logprobs
    assert lp is not None and lp.token_logprobs[0] is None  # the first prompt token has none
    assert "".join(lp.tokens) == resp.choices[1].text
    assert resp.usage is not None and resp.usage.completion_tokens == 8
    ids = client.completions.create(
        model=MODEL, prompt=[[504, 3575, 282, 4649, 314]], max_tokens=3, temperature=0
    )
    text = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0
    )
    assert ids.choices[0].text == text.choices[0].text


def test_prefix_cache_beam_search_and_best_of_over_http(
    server: RemoteServer, client: openai.OpenAI
) -> None:
    system = {"role": "system", "content": "You are a helpful assistant who answers briefly. " * 30}
    first = client.chat.completions.create(
        model=MODEL,
        messages=[system, {"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
    )
    second = client.chat.completions.create(
        model=MODEL,
        messages=[system, {"role": "user", "content": "Hello"}],
        max_tokens=4,
        temperature=0,
    )
    assert first.usage is not None and second.usage is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 256 and cached < second.usage.prompt_tokens
    beams = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, n=2,
        extra_body={"use_beam_search": True, "beam_width": 3, "length_penalty": 1.0},
    )  # fmt: skip
    assert [c.index for c in beams.choices] == [0, 1]
    assert beams.choices[0].text != beams.choices[1].text
    best = client.completions.create(
        model=MODEL, prompt="My pet is a", max_tokens=6, n=1, best_of=3, temperature=1.0, seed=2
    )
    assert len(best.choices) == 1 and best.usage is not None
    resp = httpx.post(
        server.url("/v1/completions"),
        json={"model": MODEL, "prompt": "x", "best_of": 2, "temperature": 1.0, "stream": True},
        headers=auth(),
    )
    assert (
        resp.status_code == 400
        and "cannot be combined with stream" in resp.json()["error"]["message"]
    )


def test_every_openai_chat_role_is_accepted(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "Answer briefly."},
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        max_tokens=4,
    )
    assert resp.choices[0].message.content is not None
