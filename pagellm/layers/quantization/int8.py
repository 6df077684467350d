"""int8: per-channel symmetric, quantized at load from floating-point weights.

    scale[n] = max_k |w[n, k]| / 127,   code[n, k] = round(w[n, k] / scale[n])

The kernels want a scale per block of 32 input channels, so the row's scale is
repeated per block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pagellm.layers.quantization.base import QuantizedLinearMethod, ShardWeight, as_float_tensor
from pagellm.layers.quantization.packed import BLOCK, BlockCodes

if TYPE_CHECKING:
    from pagellm.layers.linear import Linear


def quantize_int8(w: np.ndarray) -> BlockCodes:
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127, 1.0).astype(np.float32)
    codes = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    scales = np.repeat(scale[:, None], w.shape[1] // BLOCK, axis=1)
    return BlockCodes(codes, np.ascontiguousarray(scales), None, "s8")


class Int8LinearMethod(QuantizedLinearMethod):
    name = "int8"

    def to_codes(self, layer: Linear, shard: str, staged: dict[str, Any]) -> ShardWeight:
        w = as_float_tensor(staged["weight"])
        if w.shape[1] % BLOCK:
            return w  # the kernels work on blocks of 32 input channels
        return quantize_int8(w.numpy())
