"""Quantized execution end to end: the default GGUF path on the real model, int8/int4
from floating-point weights, quantized KV caches, and the perplexity benchmark.

The reference everywhere is the same checkpoint with ``quantization="none",
dtype="float32"`` (weights dequantized, fp32 KV), on 1,024 tokens of Python's
documentation (measured on 2026-11-22: reference 14.29). The bounds, in perplexity:
- GGUF kept as stored: the weights are identical, only the activations are rounded to
  int8 per block of 32, so perplexity moves far less than 1% (measured +0.13%): 0.5%;
- int8 weights (per channel): within 1% (measured +0.92%); int4 (groups of 32): within
  5% (measured +0.76%); the accuracy targets of the quantization issue;
- KV caches: bfloat16, fp8 and int8 all within 0.5% (measured +0.03 to +0.05%).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.benchmarks.perplexity import default_text, perplexity, windows
from tests.utils import prompt_logits, relative_error

TEXT_TOKENS = 1024


@pytest.fixture(scope="module")
def text_ids(smol_tokenizer: Any) -> list[int]:
    return smol_tokenizer.encode(default_text()[:20000], add_special_tokens=False)[:TEXT_TOKENS]


@pytest.fixture(scope="module")
def reference_ppl(smol_llm: Any, text_ids: list[int]) -> float:
    assert smol_llm.engine.config.model.quantization.method == "none"
    ppl, n = perplexity(smol_llm, text_ids, 256, 128)
    assert n == len(text_ids) - 1
    return ppl


@pytest.fixture(scope="module")
def hf_smol_dir(hf_smol: Any, smol_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The real SmolLM2 weights as a Hugging Face fp32 directory (from the GGUF)."""
    import json

    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("smol-hf")
    # transformers will not save a model it loaded from GGUF: write the files directly.
    cfg = hf_smol.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    state = {k: v.contiguous() for k, v in hf_smol.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(path / "model.safetensors"))
    smol_tokenizer.save_pretrained(path)
    return str(path)


def test_windows_score_every_token_once() -> None:
    for n, window, stride in ((10, 4, 2), (100, 32, 31), (7, 16, 8), (33, 8, 3)):
        spans = windows(n, window, stride)
        scored = [p for _, end, first in spans for p in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - start <= window and first > start for start, end, first in spans)
    with pytest.raises(ValueError, match="stride"):
        windows(100, 32, 32)


def test_default_model_runs_its_gguf_quantization(
    text_ids: list[int], reference_ppl: float
) -> None:
    llm = LLM(max_model_len=512, kv_cache_memory="64MiB")
    cfg = llm.engine.config
    assert cfg.model.quantization.method == "gguf" and cfg.model.dtype == "float32"
    runner = llm.engine.core.runner
    # 30 Q4_1 layers and the Q8_0 embedding (tied LM head) stay packed: ~97 MB, not 538.
    assert runner.weight_bytes < 110e6
    model = runner.model.model
    assert "u4" in model.layers[0].mlp.gate_up_proj.method.describe(
        model.layers[0].mlp.gate_up_proj
    )
    assert "s8" in model.embed_tokens.method.describe(model.embed_tokens)
    ppl, _ = perplexity(llm, text_ids, 256, 128)
    assert abs(ppl / reference_ppl - 1) < 0.005, (ppl, reference_ppl)
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    assert "Paris" in out[0].outputs[0].text


@pytest.mark.parametrize(("method", "group", "bound"), [("int8", 32, 0.01), ("int4", 32, 0.05)])
def test_int8_and_int4_from_float_weights(
    hf_smol_dir: str,
    text_ids: list[int],
    reference_ppl: float,
    method: str,
    group: int,
    bound: float,
) -> None:
    llm = LLM(
        hf_smol_dir, quantization=method, quantization_group_size=group, max_model_len=512,
        kv_cache_memory="64MiB", dtype="float32",
    )  # fmt: skip
    runner = llm.engine.core.runner
    assert runner.weight_bytes < (180e6 if method == "int8" else 120e6), runner.weight_bytes
    ppl, _ = perplexity(llm, text_ids, 256, 128)
    assert abs(ppl / reference_ppl - 1) < bound, (method, ppl, reference_ppl)


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8", "fp8_e4m3"])
def test_quantized_kv_cache(text_ids: list[int], reference_ppl: float, kv_dtype: str) -> None:
    llm = LLM(
        quantization="none", dtype="float32", kv_cache_dtype=kv_dtype, max_model_len=512,
        kv_cache_memory="32MiB",
    )  # fmt: skip
    assert llm.engine.core.runner.attn_backend.name == "cpu_native"
    cache = llm.engine.core.runner.kv_caches[0]
    elem = {"bfloat16": 2, "int8": 1, "fp8_e4m3": 1}[kv_dtype]
    assert cache.k.element_size() == elem and (cache.k_scale is not None) == (kv_dtype == "int8")
    # The memory plan counts what is stored: int8 adds a float32 scale per token and head.
    per_head = 64 * elem + (4 if kv_dtype == "int8" else 0)
    assert llm.engine.plan.kv_bytes_per_token == 30 * 2 * 3 * per_head
    assert llm.engine.plan.num_blocks == (32 << 20) // (llm.engine.plan.kv_bytes_per_token * 16)
    ppl, _ = perplexity(llm, text_ids, 256, 128)
    assert abs(ppl / reference_ppl - 1) < 0.005, (kv_dtype, ppl, reference_ppl)
    # The torch backend (the CUDA path) reads the same cache layout to the same logits,
    # up to float noise: the two backends' fp32 outputs differ by ~1e-7, and a 1e-7 change
    # can flip a value's rounding to the cache type (a bf16 step is 0.4%), which later
    # layers carry on, in proportion to the type's step (bf16 2^-8, int8 1/127 of a
    # head's largest value, fp8 2^-3): measured 0.09%, 0.3% and 1.4% of the logits,
    # against ~100% for a layout mistake.
    torch_llm = LLM(
        quantization="none", dtype="float32", kv_cache_dtype=kv_dtype, max_model_len=512,
        kv_cache_memory="32MiB", attention_backend="torch",
    )  # fmt: skip
    prompt = text_ids[:100]
    a, b = prompt_logits(llm, prompt), prompt_logits(torch_llm, prompt)
    bound = {"bfloat16": 0.005, "int8": 0.02, "fp8_e4m3": 0.05}[kv_dtype]
    assert relative_error(a, b) < bound


def test_fp8_and_bf16_kv_writes_round_like_torch() -> None:
    """The native cache writer rounds to nearest even exactly as torch's conversions do."""
    from pagellm.layers import native
    from pagellm.layers.attention import LayerKVCache

    x = torch.randn(4, 2 * 64, generator=torch.Generator().manual_seed(0)) * 40
    x[0, :8] = torch.tensor([1e-4, 2e-3, 0.0, -500.0, 449.0, 0.0117, -0.001953125, 3.3e-3])
    slots = torch.tensor([3, 0, 5, 1], dtype=torch.int64)
    for isa in native.supported_isas():
        lib = native.load(isa)
        assert lib is not None
        for name, torch_dtype, code in (
            ("bfloat16", torch.bfloat16, 1),
            ("fp8_e4m3", torch.float8_e4m3fn, 2),
        ):
            cache = LayerKVCache(
                torch.zeros(1, 8, 2, 64, dtype=torch_dtype), torch.zeros(1, 8, 2, 64, dtype=torch_dtype),
                dtype=name,
            )  # fmt: skip
            lib.pagellm_write_kv(
                x.data_ptr(), x.stride(0), x.data_ptr(), x.stride(0), cache.k.data_ptr(),
                cache.v.data_ptr(), None, None, slots.data_ptr(), 4, 2, 64, code,
            )  # fmt: skip
            ref = LayerKVCache(torch.zeros_like(cache.k), torch.zeros_like(cache.v), dtype=name)
            ref.write(slots, x.view(4, 2, 64), x.view(4, 2, 64))
            assert torch.equal(cache.k.view(torch.uint8), ref.k.view(torch.uint8)), (isa, name)


def test_torch_path_of_packed_weights_equals_the_dequantized_model(tiny_model_dirs: Any) -> None:
    """Without native kernels (the CUDA path) packed weights are dequantized per call and
    multiplied by torch: the same numbers as the dequantized model, exactly."""
    path = tiny_model_dirs["LlamaForCausalLM"]
    outs = {}
    for method in ("int8", "none"):
        llm = LLM(
            path, quantization=method, native_kernels=False, dtype="float32",
            kv_cache_memory=8 << 20,
        )  # fmt: skip
        if method == "int8":
            # Store the int8-rounded weights as the "none" model's weights below.
            runner = llm.engine.core.runner
            proj = runner.model.model.layers[0].self_attn.qkv_proj
            assert type(proj.runs[0].weight).__name__ == "TorchPackedWeight"
            dequantized = {
                name: m.runs[0].weight.dequantize()
                for name, m in runner.model.named_modules()
                if hasattr(m, "runs") and len(m.runs) == 1
            }
        else:
            for name, m in llm.engine.core.runner.model.named_modules():
                if name in dequantized:
                    m.weight.data.copy_(dequantized[name])
        params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=3, ignore_eos=True)
        outs[method] = llm.generate([list(range(200, 240))], params, use_tqdm=False)[0]
    a, b = outs["int8"], outs["none"]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):  # type: ignore[index]
        assert {t: lp.logprob for t, lp in x.items()} == {t: lp.logprob for t, lp in y.items()}
