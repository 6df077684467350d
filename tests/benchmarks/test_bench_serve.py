"""`pagellm bench serve` end to end against a live server."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from typing import Any

from tests.conftest import API_KEY, MODEL


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pagellm.entrypoints.cli", "--log-level", "WARNING", "bench", "serve", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_sweep_writes_json_sqlite_and_plots(server: Any, tmp_path: Any) -> None:
    out, db, plots = tmp_path / "r.json", tmp_path / "r.db", tmp_path / "plots"
    proc = bench(
        "--base-url", server.url(), "--api-key", API_KEY, "--num-prompts", "4", "--input-len", "12:20",
        "--output-len", "6", "--max-concurrency", "1,2", "--ignore-eos", "--goodput", "ttft:60000,tpot:60000",
        "--output-json", str(out), "--results-db", str(db), "--plot-dir", str(plots), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Benchmark summary" in proc.stdout and "Percentiles" in proc.stdout
    runs = json.loads(out.read_text())
    assert [r["max_concurrency"] for r in runs] == [1, 2]
    for r in runs:
        assert r["completed"] == 4 and r["failed"] == 0 and r["model"] == MODEL
        assert r["total_output_tokens"] == 4 * 6  # from the server's usage
        for key in ("request_throughput", "output_throughput", "total_token_throughput", "goodput"):
            assert r[key] > 0
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert set(r[key]) >= {"mean", "median", "p99"} and r[key]["median"] > 0
        assert r["goodput"] == r["request_throughput"]  # generous SLOs: every request is good
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT max_concurrency, completed, output_throughput FROM runs ORDER BY id"
        ).fetchall()
    assert [(c, n) for c, n, _ in rows] == [(1, 4), (2, 4)]
    for name in ("throughput.png", "latency.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_failing_server_is_reported_not_a_crash(server: Any, tmp_path: Any) -> None:
    out = tmp_path / "r.json"
    proc = bench(
        "--base-url", server.url(), "--api-key", "wrong-key", "--model", MODEL, "--num-prompts", "3",
        "--input-len", "8", "--output-len", "4", "--output-json", str(out), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 1  # nothing completed
    assert "Traceback" not in proc.stderr
    r = json.loads(out.read_text())
    assert r["completed"] == 0 and r["failed"] == 3
    assert r["errors"] and r["errors"][0].startswith("HTTP 401")
    assert "error: HTTP 401" in proc.stdout
    assert os.path.getsize(out) > 0


def test_sharegpt_chat_with_poisson_arrivals(server: Any, tmp_path: Any) -> None:
    data = [
        {
            "conversations": [
                {"from": "human", "value": f"Tell me fact number {i} about cats."},
                {"from": "gpt", "value": "Cats sleep a lot. " * (i + 1)},
            ]
        }
        for i in range(5)
    ]
    data.append({"conversations": [{"from": "human", "value": "lonely"}]})  # skipped: no reply
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "r.json"
    proc = bench(
        "--base-url", server.base_url, "--api-key", API_KEY, "--endpoint", "/v1/chat/completions",
        "--dataset", "sharegpt", "--dataset-path", str(path), "--num-prompts", "4", "--output-len", "5",
        "--request-rate", "20", "--burstiness", "0.5", "--ignore-eos", "--output-json", str(out), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["completed"] == 4 and r["request_rate"] == 20.0 and r["burstiness"] == 0.5
    assert r["total_output_tokens"] == 4 * 5
    assert r["total_input_tokens"] > 4 * 20  # chat template tokens counted by the server


def _closing_server() -> tuple[Any, int]:
    """A tiny OpenAI-style server that answers one request per connection and then closes
    it, although its response (chunked, no ``Connection: close``) says it could be reused:
    what llama.cpp's server does. Returns (thread, port)."""
    import asyncio
    import threading

    from pagellm.utils import get_open_port

    port = get_open_port()
    served = {"connections": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served["connections"] += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = json.loads(await reader.readexactly(length)) if length else {}
        if head.startswith(b"GET"):
            payload = json.dumps({"object": "list", "data": [{"id": "closing"}]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(payload) + payload)  # fmt: skip
        else:
            n = int(body.get("max_tokens", 4))
            events = [{"choices": [{"index": 0, "text": " x"}]} for _ in range(n)]
            events.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n}})
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
            for data in [*(json.dumps(e) for e in events), "[DONE]"]:
                chunk = f"data: {data}\n\n".encode()
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
                await asyncio.sleep(0.002)
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()  # and never serve another request on this connection

    def run() -> None:
        async def main() -> None:
            srv = await asyncio.start_server(handle, "127.0.0.1", port)
            async with srv:
                await srv.serve_forever()

        asyncio.run(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    import time

    time.sleep(0.3)
    return served, port


def test_bench_serve_survives_servers_that_close_connections(tmp_path: Any) -> None:
    served, port = _closing_server()
    out = tmp_path / "r.json"
    proc = bench(
        "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "12", "--input-len", "8",
        "--output-len", "5", "--max-concurrency", "1,4", "--output-json", str(out), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(out.read_text())
    for r in runs:
        assert r["completed"] == 12 and r["failed"] == 0, r["errors"]
        assert r["total_output_tokens"] == 12 * 5
    assert served["connections"] >= 24  # one per request: nothing was served twice on one


def test_soak_options_abandon_streams_and_repeat_waves(server: Any, tmp_path: Any) -> None:
    import time

    import httpx

    out = tmp_path / "soak.json"
    proc = bench(
        "--base-url", server.url(), "--api-key", API_KEY, "--num-prompts", "6", "--input-len", "8:32",
        "--output-len", "8:24", "--max-concurrency", "3", "--ignore-eos", "--disconnect-rate", "0.5",
        "--duration", "4", "--output-json", str(out), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["failed"] == 0, r["errors"]
    assert r["abandoned"] > 0 and r["completed"] > 0
    # Waves of 6 fresh prompts repeat until the run has lasted --duration (on a fast
    # machine several waves, on a loaded one possibly a single long one).
    assert (r["completed"] + r["abandoned"]) % 6 == 0
    assert r["duration"] >= 4
    assert "Succeeded / failed / abandoned" in proc.stdout
    # Every abandoned stream was aborted on the server: nothing left running or holding KV.
    deadline = time.monotonic() + 30
    while True:
        m = httpx.get(server.url("/metrics")).text
        running = next(
            line for line in m.splitlines() if line.startswith("pagellm:num_requests_running")
        )
        usage = next(
            line for line in m.splitlines() if line.startswith("pagellm:kv_cache_usage_perc")
        )
        if running.endswith(" 0.0") and usage.endswith(" 0.0"):
            break
        assert time.monotonic() < deadline, (running, usage)
        time.sleep(0.2)


def test_json_schema_option_constrains_every_request(server: Any, tmp_path: Any) -> None:
    """--json-schema reaches the server: a schema that admits one short document ends every
    request long before --output-len, on both endpoints; 'records' outruns it."""
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps({"enum": ["yes"]}))
    for endpoint in ("/v1/completions", "/v1/chat/completions"):
        out = tmp_path / "constrained.json"
        proc = bench(
            "--base-url", server.url(), "--api-key", API_KEY, "--num-prompts", "4",
            "--input-len", "16", "--output-len", "32", "--ignore-eos", "--endpoint", endpoint,
            "--json-schema", str(schema), "--output-json", str(out), "--no-progress",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        r = json.loads(out.read_text())
        assert r["completed"] == 4 and r["total_output_tokens"] <= 4 * 4, r
    out = tmp_path / "records.json"
    proc = bench(
        "--base-url", server.url(), "--api-key", API_KEY, "--num-prompts", "2", "--input-len", "16",
        "--output-len", "24", "--json-schema", "records", "--output-json", str(out), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["completed"] == 2 and r["total_output_tokens"] == 2 * 24, r
