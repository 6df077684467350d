"""int4: group-wise asymmetric 4-bit, quantized at load from floating-point weights.

For every group of ``group_size`` (32 or 128) input channels of a row,

    w ~ scale * code + min,   code in 0..15

starting from the group's min/max range and refined by least squares: with the codes
fixed, the best (scale, min) is a linear regression of w on the codes; re-rounding with
it and repeating a few times keeps whichever pair gave the smallest squared error (the
refinement llama.cpp's K-quant quantizer also makes). Each group's result is never
worse than plain min/max rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pagellm.layers.quantization.base import QuantizedLinearMethod, ShardWeight, as_float_tensor
from pagellm.layers.quantization.packed import BLOCK, BlockCodes

if TYPE_CHECKING:
    from pagellm.layers.linear import Linear


def quantize_int4(w: np.ndarray, group_size: int, iters: int = 6) -> BlockCodes:
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size).astype(np.float32)
    lo, hi = g.min(axis=2), g.max(axis=2)

    def round_codes(s: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.clip(np.rint((g - m[..., None]) / s[..., None]), 0, 15)
        return q, ((q * s[..., None] + m[..., None] - g) ** 2).sum(-1)

    s = np.where(hi > lo, (hi - lo) / 15, 1.0).astype(np.float32)
    m = lo
    q, err = round_codes(s, m)
    best_s, best_m, best_q, best_err = s, m, q, err
    for _ in range(iters):
        qs, qq = q.sum(-1), (q * q).sum(-1)
        ws, qw = g.sum(-1), (q * g).sum(-1)
        den = group_size * qq - qs * qs
        s_fit = (group_size * qw - qs * ws) / np.where(den > 0, den, 1)
        s = np.where((den > 0) & (s_fit > 0), s_fit, s).astype(np.float32)
        m = ((ws - s * qs) / group_size).astype(np.float32)
        q, err = round_codes(s, m)
        better = err < best_err
        best_s, best_m = np.where(better, s, best_s), np.where(better, m, best_m)
        best_q, best_err = np.where(better[..., None], q, best_q), np.minimum(err, best_err)
    per_block = group_size // BLOCK
    return BlockCodes(
        best_q.astype(np.uint8).reshape(n, k),
        np.repeat(best_s.astype(np.float32), per_block, axis=1),
        np.repeat(best_m.astype(np.float32), per_block, axis=1),
        "u4",
    )


class Int4LinearMethod(QuantizedLinearMethod):
    name = "int4"

    def to_codes(self, layer: Linear, shard: str, staged: dict[str, Any]) -> ShardWeight:
        w = as_float_tensor(staged["weight"])
        if w.shape[1] % self.config.group_size:
            return w
        return quantize_int4(w.numpy(), self.config.group_size)
