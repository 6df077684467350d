"""`pagellm run-batch`: one real CLI run over an OpenAI Batch-API file of good and bad
lines (one output line each, in order; good ones answered as the server and the offline
engine answer them, bad ones with the server's status and a message naming the problem)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pagellm import SamplingParams
from pagellm.sampling_params import PoolingParams

CHAT = [{"role": "user", "content": "Name one colour."}]
PROMPT = "The capital of France is"
EMBED_TEXT = "Paged attention keeps KV in blocks."
ENGINE_ARGS = ["--max-model-len", "1024", "--kv-cache-memory", "256MiB"]  # smol_llm_default's


def _line(custom_id: str | None, url: str, body: Any, method: str = "POST") -> str:
    obj: dict[str, Any] = {"method": method, "url": url, "body": body}
    if custom_id is not None:
        obj["custom_id"] = custom_id
    return json.dumps(obj)


# (custom_id as written in the output, the input line, status, words the message must name)
CASES: list[tuple[str | None, str, int, tuple[str, ...]]] = [
    ("chat", _line("chat", "/v1/chat/completions",
                   {"messages": CHAT, "max_tokens": 8, "temperature": 0}), 200, ()),
    ("cmpl", _line("cmpl", "/v1/completions",
                   {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}), 200, ()),
    ("embd", _line("embd", "/v1/embeddings", {"input": EMBED_TEXT, "dimensions": 16}), 200, ()),
    (None, '{"custom_id": "broken", "url": ', 400, ("Invalid JSON", "line 5")),
    ("url", _line("url", "/v1/nope", {"prompt": "x"}), 404, ("/v1/nope",)),
    ("get", _line("get", "/v1/completions", {"prompt": "x"}, "GET"), 405, ("GET",)),
    ("hot", _line("hot", "/v1/chat/completions",
                  {"messages": CHAT, "temperature": "hot"}), 400, ("temperature",)),
    ("model", _line("model", "/v1/completions",
                    {"model": "gpt-9", "prompt": "x", "max_tokens": 2}), 404, ("gpt-9",)),
    ("long", _line("long", "/v1/completions",
                   {"prompt": "x", "max_tokens": 5000}), 400, ("maximum context length",)),
    ("extra", _line("extra", "/v1/completions", {"prompt": "x", "foo": 1}), 400, ("foo",)),
    ("stream", _line("stream", "/v1/completions", {"prompt": "x", "stream": True}), 400,
     ("stream",)),
    ("chat", _line("chat", "/v1/completions", {"prompt": "x", "max_tokens": 2}), 400,
     ("duplicate", "chat")),
    (None, _line(None, "/v1/completions", {"prompt": "x"}), 400, ("custom_id",)),
]  # fmt: skip


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, list[Any]]:
    """One `pagellm run-batch -i - -o PATH` over CASES (a blank line after the third)."""
    tmp = tmp_path_factory.mktemp("run_batch")
    lines = [case[1] for case in CASES]
    lines.insert(3, "   ")  # skipped: no output line
    out = tmp / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "pagellm.entrypoints.cli", "run-batch", "-i", "-", "-o", str(out),
         "--max-concurrency", "4", *ENGINE_ARGS],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return tmp, proc, [json.loads(x) for x in out.read_text().splitlines()]


def test_one_line_per_input_line_in_order(batch_run: tuple[Path, Any, list[Any]]) -> None:
    tmp, proc, outs = batch_run
    assert [o["custom_id"] for o in outs] == [case[0] for case in CASES]
    assert [o["response"]["status_code"] for o in outs] == [case[2] for case in CASES]
    assert len({o["id"] for o in outs}) == len(outs)
    assert all(o["id"].startswith("batch_req_") for o in outs)
    assert "13 lines, 3 ok, 10 failed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp.iterdir()) == ["out.jsonl"]  # no temporary file left


def test_good_lines_answer_as_offline_engine(
    batch_run: tuple[Path, Any, list[Any]], smol_llm_default: Any
) -> None:
    outs = {o["custom_id"]: o for o in batch_run[2][:3]}
    for o in outs.values():
        assert o["error"] is None and o["response"]["request_id"].startswith("req_")
    greedy = SamplingParams(temperature=0, max_tokens=8)
    chat = outs["chat"]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] > 0
    expected = smol_llm_default.chat([CHAT], greedy, use_tqdm=False)[0].outputs[0].text
    assert chat["choices"][0]["message"]["content"] == expected
    cmpl = outs["cmpl"]["response"]["body"]
    assert cmpl["object"] == "text_completion"
    expected = smol_llm_default.generate([PROMPT], greedy, use_tqdm=False)[0].outputs[0].text
    assert cmpl["choices"][0]["text"] == expected
    embd = outs["embd"]["response"]["body"]
    ref = smol_llm_default.embed(EMBED_TEXT, PoolingParams(dimensions=16), use_tqdm=False)
    assert np.allclose(embd["data"][0]["embedding"], ref[0].outputs.embedding, atol=1e-5)


def test_bad_lines_carry_status_and_message(batch_run: tuple[Path, Any, list[Any]]) -> None:
    for (custom_id, _, status, words), o in zip(CASES[3:], batch_run[2][3:]):
        body = o["response"]["body"]["error"]
        assert o["error"] == {"code": body["code"] or body["type"], "message": body["message"]}
        for word in words:
            assert word in body["message"], (custom_id, body)
        assert body["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    model = batch_run[2][7]["response"]["body"]["error"]
    assert (model["param"], model["code"]) == ("model", "model_not_found")
    assert batch_run[2][8]["response"]["body"]["error"]["param"] == "max_tokens"


def test_unreadable_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pagellm.entrypoints import cli

    out = tmp_path / "out.jsonl"
    code = cli.main(["run-batch", "-i", str(tmp_path / "missing.jsonl"), "-o", str(out)])
    assert code == 2 and "cannot read" in capsys.readouterr().err
    assert not out.exists()
