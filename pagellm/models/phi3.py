"""Phi-3 (Phi3ForCausalLM): the Llama decoder with fused checkpoint tensors (qkv_proj,
gate_up_proj, split here into the merged layers' shards by rows: GGUF blocks stay
quantized) and LongRoPE scaling.

LongRoPE: positions below ``original_max_position_embeddings`` rotate with the short
factors, positions from there on with the long ones (what a sequence that grows past it
sees in transformers, token by token), both scaled by sqrt(1 + ln(factor) /
ln(original)) where factor = max_position_embeddings / original (or the config's
attention_factor).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from pagellm.layers.quantization.base import row_slice
from pagellm.layers.rotary import get_rope_parameters
from pagellm.models.llama import LlamaForCausalLM, head_dim_of


def longrope_cos_sin(cfg: Any, rotary_dim: int, theta: float, p: dict[str, Any]) -> torch.Tensor:
    orig = int(
        p.get("original_max_position_embeddings")
        or getattr(cfg, "original_max_position_embeddings", None)
        or cfg.max_position_embeddings
    )
    max_pos = int(cfg.max_position_embeddings)
    factor = max_pos / orig
    mscale = p.get("attention_factor")
    if mscale is None:
        mscale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    exps = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    parts = []
    for key, lo, hi in (("short_factor", 0, min(orig, max_pos)), ("long_factor", orig, max_pos)):
        if hi <= lo:
            continue
        ext = torch.tensor(p[key], dtype=torch.float32)
        if ext.numel() != rotary_dim // 2:
            raise ValueError(f"longrope {key} has {ext.numel()} values, need {rotary_dim // 2}")
        inv_freq = 1.0 / (ext * theta**exps)
        freqs = torch.outer(torch.arange(lo, hi, dtype=torch.float32), inv_freq)
        parts.append(torch.cat([freqs.cos() * mscale, freqs.sin() * mscale], dim=-1))
    return torch.cat(parts)


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: Any) -> None:
        theta, scaling = get_rope_parameters(cfg)
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
        if kind in ("longrope", "su"):
            # Build the tables here; the shared rotary is made without scaling first.
            plain = _without_rope_scaling(cfg)
            super().__init__(plain)
            self.config = cfg
            rot = self.model.rotary
            cache = longrope_cos_sin(cfg, rot.rotary_dim, theta, scaling)  # type: ignore[arg-type]
            rot.cos_sin_cache = cache.to(rot.cos_sin_cache.device, rot.cos_sin_cache.dtype)
        else:
            super().__init__(cfg)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        cfg = self.config
        hd = head_dim_of(cfg)
        q = cfg.num_attention_heads * hd
        kv = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * hd
        inter = cfg.intermediate_size

        def split() -> Iterable[tuple[str, Any]]:
            for name, tensor in weights:
                if ".qkv_proj." in name:
                    for part, (a, b) in zip(
                        ("q", "k", "v"), ((0, q), (q, q + kv), (q + kv, q + 2 * kv))
                    ):
                        yield name.replace(".qkv_proj.", f".{part}_proj."), row_slice(tensor, a, b)
                elif ".gate_up_proj." in name:
                    rows = 2 * inter
                    yield name.replace(".gate_up_proj.", ".gate_proj."), row_slice(tensor, 0, inter)
                    yield (
                        name.replace(".gate_up_proj.", ".up_proj."),
                        row_slice(tensor, inter, rows),
                    )
                else:
                    yield name, tensor

        super().load_weights(split())


def _without_rope_scaling(cfg: Any) -> Any:
    import copy

    plain = copy.copy(cfg)
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict):
        plain.rope_parameters = {"rope_type": "default", "rope_theta": get_rope_parameters(cfg)[0]}
    plain.rope_scaling = None
    return plain
