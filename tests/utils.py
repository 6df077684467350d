"""A real `pagellm serve` process on 127.0.0.1 and a free port, for tests; the logits an
offline engine computes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx

from pagellm.utils import get_open_port


@contextlib.contextmanager
def captured_logits(llm: Any) -> Iterator[list[Any]]:
    """A copy of every logits tensor the engine's model computes inside the block."""
    model = llm.engine.core.runner.model
    captured: list[Any] = []
    original = model.compute_logits

    def capture(hidden: Any) -> Any:
        out = original(hidden)
        captured.append(out.clone())
        return out

    model.compute_logits = capture
    try:
        yield captured
    finally:
        del model.compute_logits


class RemoteServer:
    """Start ``pagellm serve`` with the given arguments; ``stop()`` sends SIGTERM."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, startup_timeout: float = 180
    ) -> None:
        self.port = get_open_port()
        self.host = "127.0.0.1"
        # Lives as long as the server, not a with-block.
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            "w+", prefix="pagellm-serve-", suffix=".log", delete=False
        )
        cmd = [
            sys.executable,
            "-m",
            "pagellm.entrypoints.cli",
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url("/health"), timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"server did not start in {startup_timeout}s:\n{self.logs()}")
            time.sleep(0.3)

    def url(self, path: str = "") -> str:
        return f"http://{self.host}:{self.port}{path}"

    @property
    def base_url(self) -> str:
        return self.url("/v1")

    def logs(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait, and return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"server ignored SIGTERM for {timeout}s:\n{self.logs()}"
                ) from None
        return int(self.proc.returncode)

    def __enter__(self) -> RemoteServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def prompt_logits(llm: Any, prompt: list[int]) -> Any:
    """The logits pagellm computes at every prompt position ([n, vocab], captured at the
    LM head during one prefill step)."""
    import torch

    from pagellm import SamplingParams

    with captured_logits(llm) as captured:
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        llm.generate([prompt], params, use_tqdm=False)
    (rows,) = captured  # the sampled (last) position first, then positions 0 .. n-2
    return torch.cat([rows[1:], rows[:1]])


def relative_error(a: Any, b: Any) -> float:
    """||a - b|| / ||b|| over all entries (root mean square, so that one outlier among
    millions of logits does not decide)."""
    return float((a - b).float().norm() / b.float().norm())


def random_adapter(path: Any) -> str:
    """A rank-8 q_proj LoRA adapter for SmolLM2-135M with random weights (a second
    "model" for the routing and web page tests)."""
    import json

    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    torch.manual_seed(7)
    tensors = {}
    for layer in range(30):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(8, 576) / 24
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(576, 8) * 0.05
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}, f)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    return str(path)
