"""The native layer stack (csrc/llama_stack.c) against the module-by-module forward.

It calls the same kernels in the same order, so the logits must be bit-identical, for
every Llama-family variant (biases, q/k norms, GQA/MQA), every weight storage (float32,
int8, int4, GGUF runs of several formats in one layer, GPTQ act-order) and every KV
cache dtype with a native kernel, over prefill chunks and decode steps.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from pagellm import LLM, SamplingParams
from tests.conftest import TINY_ARCHS
from tests.utils import captured_logits


def _run(llm: LLM, fused: bool) -> tuple[list[torch.Tensor], list[list[int]]]:
    llm.engine.core.runner.model.model.native_stack_enabled = fused
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(n)] for n in (37, 5, 70)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with captured_logits(llm) as captured:
        outs = llm.generate(prompts, params, use_tqdm=False)
    return captured, [list(o.outputs[0].token_ids) for o in outs]


def _check(llm: LLM) -> None:
    assert llm.engine.core.runner.attn_backend.name == "cpu_native"
    model = llm.engine.core.runner.model.model
    fused_logits, fused_tokens = _run(llm, True)
    assert model._stack is not None and model._stack[1] is not None, "the native stack did not run"
    plain_logits, plain_tokens = _run(llm, False)
    assert fused_tokens == plain_tokens
    assert len(fused_logits) == len(plain_logits)
    for a, b in zip(fused_logits, plain_logits):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_native_stack_equals_modules(arch: str, quantization: str, tiny_model_dirs: Any) -> None:
    llm = LLM(
        tiny_model_dirs[arch], quantization=quantization, dtype="float32", block_size=4,
        kv_cache_memory=8 << 20, max_num_batched_tokens=32, enable_prefix_caching=False,
    )  # fmt: skip
    _check(llm)


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "fp8_e4m3", "int8"])
def test_native_stack_with_quantized_kv(kv_dtype: str, tiny_model_dirs: Any) -> None:
    llm = LLM(
        tiny_model_dirs["Qwen3ForCausalLM"], kv_cache_dtype=kv_dtype, dtype="float32",
        kv_cache_memory=8 << 20, max_num_batched_tokens=32, enable_prefix_caching=False,
    )  # fmt: skip
    _check(llm)


def test_native_stack_with_mixed_gguf_runs(tmp_path: Any, default_model_path: str) -> None:
    from tests.models.test_gguf import write_tiny_gguf

    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path, default_model_path)
    _check(
        LLM(path, kv_cache_memory=16 << 20, max_num_batched_tokens=32, enable_prefix_caching=False)
    )


def test_native_stack_with_gptq_act_order(tiny_model_dirs: Any, tmp_path: Any) -> None:
    from tests.models.test_awq_gptq import write_checkpoint

    path = str(tmp_path / "gptq")
    write_checkpoint(tiny_model_dirs["LlamaForCausalLM"], path, "gptq", 32, act_order=True)
    _check(
        LLM(path, kv_cache_memory=8 << 20, max_num_batched_tokens=32, enable_prefix_caching=False)
    )


def test_torch_backend_keeps_the_module_path(tiny_model_dirs: Any) -> None:
    llm = LLM(
        tiny_model_dirs["LlamaForCausalLM"], attention_backend="torch", kv_cache_memory=8 << 20
    )
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.engine.core.runner.model.model._stack is None
