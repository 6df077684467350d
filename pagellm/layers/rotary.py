"""Rotary position embedding (NeoX layout, as Hugging Face Llama/Qwen apply it).

Each head's first ``rotary_dim/2`` channels rotate with its next ``rotary_dim/2``
channels by angle ``position * inv_freq[i]``. Cos and sin for every position are
precomputed once:

    cos_sin_cache[pos] = [ cos(pos*f_0) ... cos(pos*f_{r/2-1}) | sin(pos*f_0) ... ]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagellm.layers import ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def get_rope_parameters(hf_config: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, scaling dict or None) from a transformers config of any version."""
    factors = getattr(hf_config, "pagellm_rope_freq_factors", None)
    if factors is not None:  # set by the GGUF loader (rope_freqs tensor)
        theta, _ = get_rope_parameters_plain(hf_config)
        return theta, {"rope_type": "freq_factors", "factors": list(factors)}
    return get_rope_parameters_plain(hf_config)


def get_rope_parameters_plain(hf_config: Any) -> tuple[float, dict[str, Any] | None]:
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default"))
        return theta, (dict(params) if kind != "default" else None)
    theta = float(getattr(hf_config, "rope_theta", 10000.0) or 10000.0)
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


def compute_inv_freq(rotary_dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
    inv_freq = 1.0 / (base**exponents)
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "freq_factors":
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(
        f"rope scaling type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
    )


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        max_position: int,
        base: float,
        scaling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        # Computed in fp32 on the CPU, then stored on the model's device in its dtype.
        device = torch.empty(0).device
        inv_freq = compute_inv_freq(rotary_dim, base, scaling)
        t = torch.arange(max_position, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv_freq.cpu())
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        self.cos_sin_cache: torch.Tensor
        self.register_buffer(
            "cos_sin_cache",
            cache.to(device=device, dtype=torch.get_default_dtype()),
            persistent=False,
        )
        self._lib = ops.current_native_lib()

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q[T, Hq*D] and k[T, Hkv*D] (rows may be strided views)."""
        if self._lib is not None and ops.is_native_tensor(q):
            for x in (q, k):
                T = x.shape[0]
                self._lib.pagellm_rope_f32(
                    positions.data_ptr(), x.data_ptr(), x.stride(0), self.cos_sin_cache.data_ptr(),
                    T, x.shape[1] // self.head_dim, self.head_dim, self.rotary_dim, ops.num_threads(),
                )  # fmt: skip
            return q, k
        cos_sin = self.cos_sin_cache[positions]
        half = self.rotary_dim // 2
        cos = cos_sin[:, None, :half]
        sin = cos_sin[:, None, half:]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        x = x.reshape(T, -1, self.head_dim)
        half = self.rotary_dim // 2
        x1 = x[..., :half]
        x2 = x[..., half : self.rotary_dim]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        if self.rotary_dim < self.head_dim:
            rotated = torch.cat([rotated, x[..., self.rotary_dim :]], dim=-1)
        return rotated.reshape(T, -1)
