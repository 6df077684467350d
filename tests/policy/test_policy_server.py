"""The policy in a real server with the official openai client: keys and their limits,
input blocks, output redaction and blocks in streams (the model forced by a regex to
write the text), dead-loop stops, metrics, and SIGHUP reloads (a bad file keeps the
old policy)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.utils import RemoteServer

POLICY = """\
guardrails:
  rules:
    - name: no-forbidden
      words: [forbidden]
      action: block
      stage: input
    - name: no-banana
      words: [banana]
      action: block
      stage: output
  pii:
    types: [email]
repetition:
  max_period: 4
  min_repeats: 6
keys:
  - key: sk-alice
    name: alice
    requests_per_minute: 3
  - key: sk-bob
    name: bob
    max_tokens: 5
    models: [SmolLM2-135M-Instruct]
  - key: sk-dave
    name: dave
    models: [some-adapter]
  - key: sk-erin
    name: erin
  - key: sk-frank
    name: frank
response_cache:
  ttl_seconds: 60
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(POLICY)
    with RemoteServer(["--policy", str(path), "--max-model-len", "512",
                       "--kv-cache-memory", "64MiB"]) as s:  # fmt: skip
        s.policy_path = path
        yield s


def _client(server: Any, key: str = "sk-bob") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)


def _forced(server: Any, regex: str, stream: bool, max_tokens: int = 48, key: str = "sk-bob",
            model: str = "SmolLM2-135M-Instruct") -> Any:  # fmt: skip
    return _client(server, key).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say something."}],
        temperature=0, max_tokens=max_tokens, stream=stream,
        extra_body={"structured_outputs": {"regex": regex}},
    )  # fmt: skip


def test_keys_are_required_and_checked(server: Any) -> None:
    with pytest.raises(openai.AuthenticationError):
        _client(server, "sk-nobody").models.list()
    with pytest.raises(openai.NotFoundError, match="do not have access"):
        _forced(server, "a", False, key="sk-dave")  # dave may use an adapter only


def test_embeddings_pass_the_input_policy(server: Any) -> None:
    c = _client(server)  # bob has a max_tokens cap: not an embedding option
    assert len(c.embeddings.create(model="SmolLM2-135M-Instruct", input="hello").data) == 1
    with pytest.raises(openai.BadRequestError, match="no-forbidden"):
        c.embeddings.create(model="SmolLM2-135M-Instruct", input="a forbidden word")


def test_input_block_is_a_400_naming_the_rule(server: Any) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        _client(server).chat.completions.create(
            model="SmolLM2-135M-Instruct", max_tokens=4,
            messages=[{"role": "user", "content": "Tell me the Forbidden thing"}],
        )  # fmt: skip
    assert e.value.code == "content_filter" and "no-forbidden" in str(e.value)


def test_streamed_email_is_redacted_in_every_chunk(server: Any) -> None:
    # The raw SSE body: no chunk (nor anything else sent) holds a piece of the address.
    with httpx.Client(timeout=60) as h:
        r = h.post(server.url("/v1/chat/completions"), headers={"Authorization": "Bearer sk-alice"},
                   json={"model": "SmolLM2-135M-Instruct", "stream": True, "temperature": 0,
                         "max_tokens": 40, "messages": [{"role": "user", "content": "Hi"}],
                         "structured_outputs": {"regex": r"Mail carol\.jones@example\.org today\."}})  # fmt: skip
    assert r.status_code == 200
    assert r.headers["x-ratelimit-limit-requests"] == "3"
    body = r.text
    assert "carol" not in body and "example" not in body and "@" not in body
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in body.splitlines()
        if line.startswith("data: {") and '"choices":[{' in line
    )
    assert text == "Mail [EMAIL] today."


def test_blocked_stream_ends_with_content_filter(server: Any) -> None:
    got = _client(server, "sk-alice")
    finishes, text = [], ""
    for c in got.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Go"}],
        temperature=0, max_tokens=30, stream=True,
        extra_body={"structured_outputs": {"regex": "I ate a banana and then more fruit"}},
    ):  # fmt: skip
        if c.choices:
            text += c.choices[0].delta.content or ""
            finishes.append(c.choices[0].finish_reason)
    assert finishes[-1] == "content_filter" and text == "I ate a "


def test_max_tokens_cap_dead_loop_and_metrics(server: Any) -> None:
    r = _forced(server, "(ab)+", False, max_tokens=100)
    assert r.usage.completion_tokens <= 5  # bob's cap
    # A loop: the regex forces "ababab...", stopped as a repetition.
    with httpx.Client(timeout=60) as h:
        rr = h.post(server.url("/v1/completions"), headers={"Authorization": "Bearer sk-alice"},
                    json={"model": "SmolLM2-135M-Instruct", "prompt": "x", "max_tokens": 60,
                          "temperature": 0, "structured_outputs": {"regex": "(ab)+"}})  # fmt: skip
        assert rr.status_code == 200, rr.text
        choice = rr.json()["choices"][0]
        assert choice["finish_reason"] == "repetition"
        assert rr.json()["usage"]["completion_tokens"] < 60
        metrics = h.get(server.url("/metrics")).text
    assert (
        'pagellm:policy_actions_total{action="block",stage="input",rule="no-forbidden"}' in metrics
    )
    assert "pagellm:policy_repetition_stops_total 1" in metrics
    assert 'pagellm:key_usage_total{key="bob",kind="requests"}' in metrics


def test_response_cache_answers_repeats_per_key(server: Any) -> None:
    ask = {"model": "SmolLM2-135M-Instruct", "max_tokens": 12, "temperature": 0,
           "messages": [{"role": "user", "content": "Name a colour."}]}  # fmt: skip
    with httpx.Client(timeout=60) as h:

        def post(key: str, **extra: Any) -> httpx.Response:
            r = h.post(server.url("/v1/chat/completions"),
                       headers={"Authorization": f"Bearer {key}"}, json={**ask, **extra})  # fmt: skip
            assert r.status_code == 200, r.text
            return r

        first = post("sk-erin")
        assert first.headers["x-pagellm-cache"] == "miss"
        again = post("sk-erin")
        assert again.headers["x-pagellm-cache"] == "hit"
        answer = first.json()["choices"][0]["message"]["content"]
        assert again.json()["choices"][0]["message"]["content"] == answer
        assert (
            again.json()["usage"]["completion_tokens"] == first.json()["usage"]["completion_tokens"]
        )
        streamed = post("sk-erin", stream=True)
        assert streamed.headers["x-pagellm-cache"] == "hit"
        text = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            for line in streamed.text.splitlines()
            if line.startswith("data: {") and '"choices":[{' in line
        )
        assert text == answer
        # Another key never sees erin's replies; sampling is never cached.
        assert post("sk-frank").headers["x-pagellm-cache"] == "miss"
        assert "x-pagellm-cache" not in post("sk-erin", temperature=0.8).headers
        metrics = h.get(server.url("/metrics")).text
    assert 'pagellm:response_cache_total{result="hit",match="exact"} 2' in metrics
    assert again.json()["usage"]["response_cache"] == "exact"
    assert again.headers["x-pagellm-cache-match"] == "exact"
    assert "response_cache" not in first.json()["usage"]


def test_burst_then_reload(server: Any) -> None:
    # alice: 3 requests per minute, some used above; a burst: the rest are 429.
    with httpx.Client(timeout=60) as h:
        codes = []
        for _ in range(5):
            r = h.post(server.url("/v1/completions"), headers={"Authorization": "Bearer sk-alice"},
                       json={"model": "SmolLM2-135M-Instruct", "prompt": "x", "max_tokens": 1})  # fmt: skip
            codes.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.headers["x-ratelimit-remaining-requests"] == "0"
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert codes.count(429) >= 2 and set(codes) <= {200, 429}
        # A bad reload keeps the old policy: "forbidden" is still blocked.
        server.policy_path.write_text(
            "guardrails:\n  rules:\n    - words: [x]\n      action: nuke\n"
        )
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        ask = {"model": "SmolLM2-135M-Instruct", "max_tokens": 2,
               "messages": [{"role": "user", "content": "forbidden"}]}  # fmt: skip
        r = h.post(
            server.url("/v1/chat/completions"), headers={"Authorization": "Bearer sk-bob"}, json=ask
        )
        assert r.status_code == 400
        assert "line 4" in server.logs() and "keeping the previous policy" in server.logs()
        # A good one swaps it: no rules, a new key.
        server.policy_path.write_text("keys:\n  - key: sk-carol\n")
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        r = h.post(server.url("/v1/chat/completions"),
                   headers={"Authorization": "Bearer sk-carol"}, json=ask)  # fmt: skip
        assert r.status_code == 200, r.text
        r = h.post(
            server.url("/v1/chat/completions"), headers={"Authorization": "Bearer sk-bob"}, json=ask
        )
        assert r.status_code == 401
        assert (
            'pagellm:policy_reloads_total{result="failed"} 1' in h.get(server.url("/metrics")).text
        )


def test_bad_policy_stops_start_up_naming_the_line(tmp_path: Any) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("keys:\n  - key: a\n    max_concurrent: -1\n")
    with pytest.raises(RuntimeError, match="line 3: max_concurrent must be an integer"):
        RemoteServer(["--policy", str(path)])
