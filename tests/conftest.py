"""Shared fixtures: the real SmolLM2 model, tiny random models of every architecture,
and the transformers references they are checked against."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

API_KEY = "sk-test-123"
MODEL = "SmolLM2-135M-Instruct"
# The shared server runs pagellm's defaults, as users run it (the GGUF's own quantization,
# float32); tests that compare it with offline output use an offline engine with the same
# defaults (``smol_llm_default``), not an fp32 reference.
SERVER_ARGS = [
    "--max-model-len",
    "1024",
    "--kv-cache-memory",
    "512MiB",
    "--reasoning-parser",
    "qwen3",
]
CORS_ORIGIN = "http://page.example"
"""The one origin the shared server lets browsers call it from (--allowed-origins)."""

# SmolLM2 in fp32: 30 layers x (K, V) x 3 KV heads x 64 dims x 4 bytes = 45 KiB per token.
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4

TINY_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@pytest.fixture(scope="session")
def default_model_path() -> str:
    from pagellm.models.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smol_tokenizer(default_model_path: str) -> Any:
    from pagellm.engine.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path)


@pytest.fixture(scope="session")
def smol_llm() -> Iterator[Any]:
    """The real model in the reference mode (weights dequantized, fp32; native CPU
    kernels), shared by tests that compare with fp32 references such as transformers."""
    from pagellm import LLM

    llm = LLM(max_model_len=2048, kv_cache_memory="512MiB", dtype="float32", quantization="none")
    yield llm


@pytest.fixture(scope="session")
def smol_llm_default() -> Iterator[Any]:
    """The real model with pagellm's defaults (what `pagellm serve` runs with no flags)."""
    from pagellm import LLM

    llm = LLM(max_model_len=1024, kv_cache_memory="256MiB")
    yield llm


@pytest.fixture(scope="session")
def hf_smol(default_model_path: str) -> Any:
    """transformers' own GGUF loader: the independent reference for the real model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(default_model_path),
        gguf_file=os.path.basename(default_model_path),
        dtype=torch.float32,
    )
    return model.eval()


def tiny_config(arch: str) -> Any:
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        architectures=[arch],
    )
    if arch == "LlamaForCausalLM":
        return transformers.LlamaConfig(
            **common,
            tie_word_embeddings=False,
            rope_theta=10000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        )
    if arch == "MistralForCausalLM":
        return transformers.MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    if arch == "Qwen2ForCausalLM":
        common["num_key_value_heads"] = 1  # MQA
        return transformers.Qwen2Config(
            **common, tie_word_embeddings=True, use_sliding_window=False
        )
    if arch == "Qwen3ForCausalLM":
        return transformers.Qwen3Config(**common, head_dim=64, tie_word_embeddings=True)
    raise AssertionError(arch)


@pytest.fixture(scope="session")
def tiny_model_dirs(
    tmp_path_factory: pytest.TempPathFactory, smol_tokenizer: Any
) -> dict[str, str]:
    """A saved random model per architecture (2 layers, GQA/MQA), with biases and
    q/k-norm weights randomised so that loading them is actually tested."""
    return {
        arch: save_random_model(tmp_path_factory, smol_tokenizer, arch, tiny_config(arch))
        for arch in TINY_ARCHS
    }


def save_random_model(
    tmp_path_factory: pytest.TempPathFactory,
    tokenizer: Any,
    name: str,
    config: Any,
    norm_mean: float = 1.0,
) -> str:
    """A random model of ``config`` (seed 0) saved with the tokenizer: biases ~ N(0, 0.1)
    and norm weights ~ N(norm_mean, 0.2), so that loading them is tested too."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if param_name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in param_name:
                p.normal_(norm_mean, 0.2)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def hf_logits(model: Any, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


@pytest.fixture(scope="session")
def server() -> Iterator[Any]:
    """One real `pagellm serve` process (with an API key) shared by the server tests."""
    from tests.utils import RemoteServer

    srv = RemoteServer([*SERVER_ARGS, "--api-key", API_KEY, "--allowed-origins", CORS_ORIGIN])
    yield srv
    assert srv.stop() == 0, srv.logs()
    assert "Traceback" not in srv.logs()
