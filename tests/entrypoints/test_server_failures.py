"""Server behaviour when something breaks inside: 500 without a traceback, and a dead
engine loop answering 503 instead of hanging clients (in-process, tiny model)."""

from __future__ import annotations

import argparse
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pagellm.engine.arg_utils import EngineArgs
from pagellm.engine.async_llm import AsyncLLM
from pagellm.entrypoints.openai.api_server import build_app


@pytest.fixture
def tiny_app(tiny_model_dirs: dict[str, str]) -> tuple[AsyncLLM, Any]:
    engine = AsyncLLM.from_engine_args(
        EngineArgs(
            model=tiny_model_dirs["LlamaForCausalLM"],
            kv_cache_memory=8 << 20,
            served_model_name="tiny",
        )
    )
    args = argparse.Namespace(api_key=None, log_stats=False)
    return engine, build_app(engine, args)


def test_unexpected_error_is_500_without_traceback(
    tiny_app: tuple[AsyncLLM, Any], monkeypatch: Any
) -> None:
    engine, app = tiny_app

    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(engine, "add_request", broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}
        )
    assert resp.status_code == 500
    body = resp.json()
    assert body["error"]["type"] == "server_error"
    assert "secret internal detail" not in resp.text and "Traceback" not in resp.text


def test_dead_engine_answers_503(tiny_app: tuple[AsyncLLM, Any]) -> None:
    engine, app = tiny_app
    with TestClient(app, raise_server_exceptions=False) as client:
        ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200
        engine.client.kill()  # the engine process dies
        deadline = time.monotonic() + 30
        while not engine.errored and time.monotonic() < deadline:
            time.sleep(0.05)
        first = client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}
        )
        assert first.status_code == 503
        assert first.json()["error"]["code"] == "engine_dead"
        assert client.get("/health").status_code == 503
        again = client.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
        )
        assert again.status_code == 503
