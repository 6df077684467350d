"""AWQ and GPTQ checkpoints: written here from the formats' specifications (AutoAWQ GEMM,
AutoGPTQ v1 and GPTQModel v2 packing, act-order g_idx), loaded by pagellm.

- ``quantization="none"`` dequantizes the codes: its logits must equal transformers'
  on an fp32 checkpoint holding (code - zero) * scale, which checks the unpacking;
- the default (``auto``) runs the int4 kernels: within the activation-rounding error of
  the dequantized run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

import numpy as np
import pytest
import torch

from pagellm import LLM, SamplingParams
from tests.conftest import hf_logits
from tests.utils import prompt_logits, relative_error

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack_nibbles(vals: np.ndarray, order: list[int] | None = None) -> np.ndarray:
    """[R, 8 C] values 0..15 -> int32 [R, C]: value j of each run of 8 goes to nibble
    ``order.index(j)`` (AWQ) or nibble j (sequential)."""
    r, c8 = vals.shape
    v = vals.reshape(r, c8 // 8, 8).astype(np.uint32)
    words = np.zeros((r, c8 // 8), dtype=np.uint32)
    for j in range(8):
        nib = order.index(j) if order else j
        words |= v[..., j] << np.uint32(4 * nib)
    return words.view(np.int32)


def quantize_groups(w: np.ndarray, g_idx: np.ndarray, n_groups: int, sym: bool) -> tuple[Any, ...]:
    """Round-to-nearest 4-bit codes per (row, group): codes [N, K], zeros and fp16 scales
    [N, groups]."""
    n, k = w.shape
    zeros = np.zeros((n, n_groups), np.int64)
    scales = np.zeros((n, n_groups), np.float16)
    codes = np.zeros((n, k), np.int64)
    for g in range(n_groups):
        cols = np.nonzero(g_idx == g)[0]
        part = w[:, cols]
        if sym:
            s = np.abs(part).max(1) / 7.5
            z = np.full(n, 8)
        else:
            lo, hi = part.min(1), part.max(1)
            s = (hi - lo) / 15
            z = np.clip(np.round(-lo / s), 0, 15).astype(np.int64)
        s16 = s.astype(np.float16)
        codes[:, cols] = np.clip(
            np.round(part / s16.astype(np.float32)[:, None]) + z[:, None], 0, 15
        )
        zeros[:, g], scales[:, g] = z, s16
    return codes, zeros, scales


def write_checkpoint(src: str, dst: str, kind: str, group: int, **opts: Any) -> str:
    """Copy a tiny fp32 model as an AWQ or GPTQ checkpoint (``dst``) and as the fp32
    checkpoint of the same dequantized weights (``dst``-ref). Returns the ref path."""
    from safetensors.torch import load_file, save_file

    ref = dst + "-ref"
    for d in (dst, ref):
        shutil.copytree(src, d)
    state = load_file(os.path.join(src, "model.safetensors"))
    quant: dict[str, torch.Tensor] = {}
    deq: dict[str, torch.Tensor] = {}
    rng = np.random.default_rng(0)
    for name, t in state.items():
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if module not in TARGETS:
            quant[name] = deq[name] = t
            continue
        w = t.float().numpy()
        k = w.shape[1]
        n_groups = k // group
        g_idx = np.arange(k) // group
        if opts.get("act_order"):
            g_idx = g_idx[rng.permutation(k)]  # each group's channels scattered over K
        codes, zeros, scales = quantize_groups(w, g_idx, n_groups, opts.get("sym", False))
        prefix = name[: -len("weight")]
        deq[name] = torch.from_numpy(
            ((codes - zeros[:, g_idx]) * scales.astype(np.float32)[:, g_idx]).astype(np.float32)
        )
        if kind == "awq":
            quant[prefix + "qweight"] = torch.from_numpy(pack_nibbles(codes.T, AWQ_ORDER))
            quant[prefix + "qzeros"] = torch.from_numpy(pack_nibbles(zeros.T, AWQ_ORDER))
            quant[prefix + "scales"] = torch.from_numpy(np.ascontiguousarray(scales.T))
        else:
            stored = zeros - 1 if opts.get("format", "gptq") == "gptq" else zeros
            qweight = pack_nibbles(codes).T  # [K / 8, N]: 8 input channels per word
            quant[prefix + "qweight"] = torch.from_numpy(np.ascontiguousarray(qweight))
            quant[prefix + "qzeros"] = torch.from_numpy(
                pack_nibbles(np.ascontiguousarray(stored.T))
            )
            quant[prefix + "scales"] = torch.from_numpy(np.ascontiguousarray(scales.T))
            quant[prefix + "g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
    save_file(quant, os.path.join(dst, "model.safetensors"))
    save_file(deq, os.path.join(ref, "model.safetensors"))
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if kind == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
              "version": "gemm"}  # fmt: skip
    else:
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group,
              "desc_act": bool(opts.get("act_order")), "sym": bool(opts.get("sym")),
              "checkpoint_format": opts.get("format", "gptq")}  # fmt: skip
    cfg["quantization_config"] = qc
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return ref


CASES = {
    "awq-g32": ("awq", 32, {}),
    "awq-g128": ("awq", 128, {}),
    "gptq-v1-g32": ("gptq", 32, {}),
    "gptq-v2-sym-g128": ("gptq", 128, {"format": "gptq_v2", "sym": True}),
    "gptq-act-order-g32": ("gptq", 32, {"act_order": True}),
}


def _prompt_logprobs(llm: LLM, prompt: list[int]) -> torch.Tensor:
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=5)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out.prompt_logprobs is not None
    rows = []
    for entry in out.prompt_logprobs[1:]:
        assert entry is not None
        rows.append(sorted((tok, lp.logprob) for tok, lp in entry.items()))
    return rows  # type: ignore[return-value]


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_loads_and_matches_its_dequantized_weights(
    case: str, tiny_model_dirs: dict[str, str], tmp_path: Any
) -> None:
    from transformers import AutoModelForCausalLM

    kind, group, opts = CASES[case]
    path = str(tmp_path / case)
    ref = write_checkpoint(tiny_model_dirs["LlamaForCausalLM"], path, kind, group, **opts)
    rng = random.Random(1)
    prompt = [rng.randrange(100, 49000) for _ in range(30)]
    hf = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    truth = hf_logits(hf, prompt).log_softmax(-1)

    dense = LLM(path, quantization="none", dtype="float32", kv_cache_memory=8 << 20)
    assert dense.engine.config.model.quantization.checkpoint_method == kind
    for pos, row in enumerate(_prompt_logprobs(dense, prompt), start=1):
        for tok, lp in row:
            assert abs(lp - truth[pos - 1, tok].item()) < 1e-4, (pos, tok)

    packed = LLM(path, dtype="float32", kv_cache_memory=8 << 20)
    assert packed.engine.config.model.quantization.method == kind
    layer = packed.engine.core.runner.model.model.layers[0]
    assert "u4" in layer.self_attn.qkv_proj.method.describe(layer.self_attn.qkv_proj)
    # Each matmul's activations are rounded to int8 per block of 32: about 0.5% of its
    # output (root mean square); nine matmuls deep in a random network that comes to a
    # few percent of the logits. A packing mistake would be of the order of 100%.
    assert relative_error(prompt_logits(packed, prompt), prompt_logits(dense, prompt)) < 0.05


def test_bad_quantization_requests(tiny_model_dirs: dict[str, str], tmp_path: Any) -> None:
    plain = tiny_model_dirs["LlamaForCausalLM"]
    with pytest.raises(ValueError, match=r"quantization='gguf' needs a \.gguf"):
        LLM(plain, quantization="gguf")
    with pytest.raises(ValueError, match=r"needs a checkpoint whose config\.json has a awq"):
        LLM(plain, quantization="awq")
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(plain, quantization="nf4")
    with pytest.raises(ValueError, match="must be 32 or 128"):
        LLM(plain, quantization="int4", quantization_group_size=64)
    path = str(tmp_path / "awq")
    write_checkpoint(plain, path, "awq", 32)
    with pytest.raises(ValueError, match="already quantized with awq"):
        LLM(path, quantization="int8")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"]["version"] = "gemv"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="AWQ version 'gemv' is not supported"):
        LLM(path)
