"""The server under load and failure, as clients see it: overload answered 429 before any
stream starts, a disconnect storm that leaves nothing behind, a stalled engine turning
/health unhealthy, and a dead engine process answering 503 while the server exits 1."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, SERVER_ARGS
from tests.utils import RemoteServer

PROMPT = "Write a long story about a lighthouse keeper."


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        named = line.startswith(name + "{") or line.startswith(name + " ")
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_idle(server: RemoteServer, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        m = httpx.get(server.url("/metrics")).text
        gauges = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
        if all(metric(m, f"pagellm:{g}") == 0 for g in gauges):
            return m
        assert time.monotonic() < deadline, "the server did not become idle"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def busy_server() -> Any:
    srv = RemoteServer([*SERVER_ARGS, "--max-num-seqs", "2", "--max-queued-requests", "3"])
    yield srv
    assert srv.stop() == 0, srv.logs()
    logs = srv.logs()
    assert "Exception in ASGI application" not in logs and "Traceback" not in logs, logs


async def _one(client: httpx.AsyncClient, url: str, stream: bool, chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 48, "ignore_eos": True, "stream": stream}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if chat:
        body["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        body["prompt"] = PROMPT
    async with client.stream("POST", url + path, json=body) as resp:
        raw = (await resp.aread()).decode()
        return {"status": resp.status_code, "headers": resp.headers, "body": raw, "stream": stream}


def test_overload_is_refused_before_streams_start(busy_server: RemoteServer) -> None:
    """10x the queue limit at once, streaming and not, chat and completions: each gets
    200 with a complete response (a stream ending in [DONE]) or 429 with Retry-After."""

    async def storm() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=300) as client:
            jobs = [
                _one(client, busy_server.url(), stream=i % 2 == 0, chat=i % 3 == 0)
                for i in range(30)
            ]
            return await asyncio.gather(*jobs)

    results = asyncio.run(storm())
    ok = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 429]
    assert len(ok) + len(refused) == len(results), [r["status"] for r in results]
    assert ok and refused
    assert any(r["stream"] for r in refused) and any(not r["stream"] for r in refused)
    for r in refused:
        assert r["headers"]["retry-after"] == "1"
        assert '"code":"queue_full"' in r["body"].replace(" ", "")
    for r in ok:
        if r["stream"]:
            assert r["body"].rstrip().endswith("data: [DONE]"), r["body"][-300:]
            assert '"finish_reason":"length"' in r["body"].replace(" ", "")
            assert '"error"' not in r["body"]
        else:
            assert '"finish_reason":"length"' in r["body"].replace(" ", "")
    wait_idle(busy_server)


def test_disconnect_storm_leaves_nothing_running(busy_server: RemoteServer) -> None:
    """100 clients leave at random points (before the first token, mid-stream, while
    queued): afterwards nothing runs, nothing waits and no KV block is in use."""
    rng = random.Random(0)

    async def leaver(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": MODEL, "prompt": f"{PROMPT} ({i})", "max_tokens": 200,
                "ignore_eos": True, "stream": True}  # fmt: skip
        keep = rng.randrange(0, 6)
        try:
            async with client.stream("POST", busy_server.url("/v1/completions"), json=body) as r:
                if r.status_code != 200:
                    return  # refused (429): nothing to leave
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen > keep:
                        break
        except httpx.HTTPError:
            pass

    async def storm() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            await asyncio.gather(*(leaver(client, i) for i in range(100)))

    asyncio.run(storm())
    m = wait_idle(busy_server)
    assert metric(m, "pagellm:request_success_total", finished_reason="abort") > 0


def test_cors_is_off_by_default(busy_server: RemoteServer) -> None:
    r = httpx.options(
        busy_server.url("/v1/chat/completions"),
        headers={"Origin": "http://page.example", "Access-Control-Request-Method": "POST"},
    )
    assert r.headers.get("access-control-allow-origin") is None


def test_priority_field_is_accepted(busy_server: RemoteServer) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "priority": -5}
    assert httpx.post(busy_server.url("/v1/completions"), json=body).status_code == 200
    bad = httpx.post(busy_server.url("/v1/completions"), json={**body, "priority": "high"})
    assert bad.status_code == 400


def _engine_pid(server: RemoteServer) -> int:
    match = re.search(r"engine process (\d+)", server.logs())
    assert match, server.logs()
    return int(match.group(1))


def test_stalled_engine_then_dead_engine() -> None:
    srv = RemoteServer([*SERVER_ARGS, "--step-timeout", "1"])
    try:
        pid = _engine_pid(srv)
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True,
                "stream": True}  # fmt: skip
        with httpx.stream("POST", srv.url("/v1/completions"), json=body, timeout=120) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            # A stalled engine (stopped, not dead): unhealthy until steps resume.
            os.kill(pid, signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 20
                while httpx.get(srv.url("/health")).status_code == 200:
                    assert time.monotonic() < deadline, "the watchdog never fired"
                    time.sleep(0.2)
                health = httpx.get(srv.url("/health"))
                assert (
                    health.status_code == 503 and health.json()["error"]["code"] == "engine_stalled"
                )
            finally:
                os.kill(pid, signal.SIGCONT)
            deadline = time.monotonic() + 20
            while httpx.get(srv.url("/health")).status_code != 200:
                assert time.monotonic() < deadline, "health did not recover"
                time.sleep(0.2)
            # Now the engine process dies mid-stream: the stream ends with an error
            # event and [DONE], new requests get 503, and the server exits 1.
            os.kill(pid, signal.SIGKILL)
            rest = [line for line in lines if line]
        assert rest and rest[-1] == "data: [DONE]", rest[-3:]
        assert any('"engine_dead"' in line for line in rest), rest[-3:]
        deadline = time.monotonic() + 30
        while srv.proc.poll() is None:
            try:
                r = httpx.post(srv.url("/v1/completions"), json={"model": MODEL, "prompt": "x"})
                assert r.status_code == 503
                assert httpx.get(srv.url("/health")).status_code == 503
            except httpx.TransportError:
                pass  # already shutting down
            assert time.monotonic() < deadline, "the server did not exit"
            time.sleep(0.2)
        assert srv.proc.returncode == 1, srv.logs()
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
