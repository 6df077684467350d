"""Data-parallel serving: `pagellm serve -dp 2` on the real model (one core per replica).

Requests that share a prefix land on the replica caching it (cached_tokens on the
second), sessions stick, metrics carry an ``engine`` label and vLLM's gauge names, and a
killed replica leaves the other serving while /health names it."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.utils import RemoteServer

MODEL = "smol-dp"
# About 140 tokens of shared system prompt: eight full 16-token blocks.
SYSTEM = (
    "You are a careful assistant for a hardware store. Answer in one short sentence. "
    "Always mention the aisle number, never invent prices, and keep a friendly tone. "
) * 4


def metrics(server: RemoteServer) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(server.url("/metrics")).text
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def per_engine(samples: list[tuple[str, dict[str, str], float]], name: str) -> dict[str, float]:
    return {lab["engine"]: v for n, lab, v in samples if n == name}


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    with RemoteServer(
        ["--data-parallel-size", "2", "--served-model-name", MODEL, "--max-model-len", "1024",
         "--kv-cache-memory", "128MiB", "--step-timeout", "0"],
    ) as srv:  # fmt: skip
        yield srv


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="none")


def chat(client: openai.OpenAI, question: str, **extra: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        max_tokens=4,
        temperature=0,
        **extra,  # type: ignore[arg-type]
    )


def test_two_replicas_report_health_and_metrics(server: RemoteServer) -> None:
    health = httpx.get(server.url("/health"))
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok"
    assert [e["engine"] for e in body["engines"]] == [0, 1]
    assert all(e["alive"] for e in body["engines"])
    assert body["engines"][0]["pid"] != body["engines"][1]["pid"]
    m = metrics(server)
    assert per_engine(m, "pagellm:engine_alive") == {"0": 1.0, "1": 1.0}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc"):  # fmt: skip
        assert set(per_engine(m, name)) == {"0", "1"}, name


def test_shared_prefix_lands_on_the_replica_caching_it(
    server: RemoteServer, client: openai.OpenAI
) -> None:
    first = chat(client, "Where are the hammers?")
    assert first.usage is not None
    # Each later one reuses the system prompt's blocks (7 of its 9 full blocks at least):
    # it went where they are cached (a coin toss would miss half the time).
    for q in ("Where is the paint?", "Do you cut keys?", "Where are the ladders?"):
        out = chat(client, q)
        assert out.usage is not None and out.usage.prompt_tokens_details is not None
        assert out.usage.prompt_tokens_details.cached_tokens >= 112, q
    # Each replica's prefix counters: all the hits are on one of them.
    hits = sorted(per_engine(metrics(server), "vllm:prefix_cache_hits_total").values())
    assert hits[0] == 0 and hits[1] >= 3 * 112


def test_unrelated_requests_spread_over_both_replicas(
    server: RemoteServer, client: openai.OpenAI
) -> None:
    before = per_engine(metrics(server), "pagellm:generation_tokens_total")
    # Concurrent, no shared prefix: the least loaded replica takes each one.
    with httpx.Client(base_url=server.base_url, timeout=120) as http:

        def one(i: int) -> int:
            r = http.post("/completions", json={"model": MODEL, "prompt": f"{i} " * (40 + i),
                                                "max_tokens": 16, "temperature": 0})  # fmt: skip
            return r.status_code

        with cf.ThreadPoolExecutor(6) as pool:
            assert list(pool.map(one, range(6))) == [200] * 6
    after = per_engine(metrics(server), "pagellm:generation_tokens_total")
    grew = {e for e in after if after[e] > before.get(e, 0)}
    assert grew == {"0", "1"}


def test_session_sticks_to_one_replica(server: RemoteServer, client: openai.OpenAI) -> None:
    def served_by() -> dict[str, float]:
        return per_engine(metrics(server), "pagellm:generation_tokens_total")

    turns = []
    for i in range(3):
        before = served_by()
        client.completions.create(model=MODEL, prompt=f"unrelated prompt number {i} " * (i + 1),
                                  max_tokens=2, temperature=0,
                                  extra_headers={"X-Session-ID": "conversation-7"})  # fmt: skip
        after = served_by()
        turns.append({e for e in after if after[e] > before.get(e, 0)})
    assert len(turns[0]) == 1 and turns[0] == turns[1] == turns[2]


def test_killed_replica_leaves_the_other_serving(
    server: RemoteServer, client: openai.OpenAI
) -> None:
    engines = httpx.get(server.url("/health")).json()["engines"]
    victim = engines[1]["pid"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        body = httpx.get(server.url("/health")).json()
        if not body["engines"][1]["alive"]:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    health = httpx.get(server.url("/health"))
    assert health.status_code == 200  # still serving
    assert health.json()["status"] == "degraded"
    assert "error" in health.json()["engines"][1]
    # Every new request goes to the survivor, the shared-prefix ones included.
    for q in ("Where are the nails?", "Where are the saws?", "Do you sell rope?"):
        out = chat(client, q)
        assert out.choices[0].finish_reason in ("stop", "length")
    assert per_engine(metrics(server), "pagellm:engine_alive") == {"0": 1.0, "1": 0.0}
    assert server.proc.poll() is None
