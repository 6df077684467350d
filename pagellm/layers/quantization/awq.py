"""AWQ: AutoAWQ "GEMM" checkpoints, mapped onto the int4 kernels.

Per quantized Linear the checkpoint holds (K input, N output channels, group size G):

    qweight  int32 [K, N / 8]   8 codes per word along N, nibble i = column 8c + ORDER[i]
    qzeros   int32 [K / G, N / 8]   packed the same way
    scales   fp16  [K / G, N]
    w[n, k] = (code - zero) * scale        ORDER = 0, 2, 4, 6, 1, 3, 5, 7

so code, scale and min = -zero * scale (exact in float32) fill ``BlockCodes``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from pagellm.layers.quantization.base import (
    QuantizedLinearMethod,
    ShardWeight,
    Span,
    as_float_tensor,
    packed_span,
)
from pagellm.layers.quantization.packed import BLOCK, BlockCodes

if TYPE_CHECKING:
    from pagellm.layers.linear import Linear

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _np(t: Any) -> np.ndarray:
    return t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def unpack_awq_words(words: np.ndarray) -> np.ndarray:
    """int32 [R, C] -> codes [R, 8 C] in column order (AWQ's nibble interleave undone)."""
    u = words.astype(np.int64) & 0xFFFFFFFF
    nib = (u[..., None] >> (4 * np.arange(8))) & 0xF  # [R, C, 8]: nibble i
    out = np.empty_like(nib)
    out[..., list(AWQ_ORDER)] = nib
    return out.reshape(words.shape[0], -1)


def affine_codes(
    codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray, group: int
) -> BlockCodes:
    """codes [N, K] in 0..15, zeros and scales [N, K / group] -> BlockCodes (u4)."""
    rep = group // BLOCK
    s = np.repeat(scales.astype(np.float32), rep, axis=1)
    m = -np.repeat(zeros.astype(np.float32), rep, axis=1) * s
    return BlockCodes(codes.astype(np.uint8), s, m, "u4")


def check_awq_config(cfg: dict[str, Any]) -> int:
    """The group size of an AWQ quantization_config; ValueError for what pagellm cannot run."""
    bits = int(cfg.get("bits", cfg.get("w_bit", 4)))
    version = str(cfg.get("version", "gemm")).lower()
    if bits != 4:
        raise ValueError(f"AWQ checkpoints with bits={bits} are not supported (only 4)")
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not supported (only 'gemm')")
    if not cfg.get("zero_point", True):
        raise ValueError("AWQ checkpoints without zero points are not supported")
    return int(cfg.get("group_size", cfg.get("q_group_size", 128)))


class AWQLinearMethod(QuantizedLinearMethod):
    name = "awq"
    required: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales")

    def slice_tensor(self, param_name: str, tensor: Any, rows: Span, cols: Span) -> Any:
        """Tensor-parallel parts of AWQ's [K(, /G), N(/8)] tensors: output columns in
        whole words of 8, input rows in whole groups."""
        if param_name not in ("qweight", "qzeros", "scales"):
            return super().slice_tensor(param_name, tensor, rows, cols)
        t = _np(tensor)
        if rows is not None:  # output channels: the tensors' columns
            t = t[:, packed_span(rows, 1 if param_name == "scales" else 8, f"AWQ {param_name}")]
        if cols is not None:  # input channels: the tensors' rows (per group for zeros/scales)
            per = 1 if param_name == "qweight" else check_awq_config(self.config.checkpoint)
            t = t[packed_span(cols, per, f"AWQ {param_name} (groups of the input)")]
        return np.ascontiguousarray(t)

    def to_codes(self, layer: Linear, shard: str, staged: dict[str, Any]) -> ShardWeight:
        if "weight" in staged:  # a module the checkpoint left unquantized
            return as_float_tensor(staged["weight"])
        k = layer.in_features
        group = check_awq_config(self.config.checkpoint)
        group = k if group in (-1, 0) else group
        codes = unpack_awq_words(_np(staged["qweight"])).T  # [N, K]
        zeros = unpack_awq_words(_np(staged["qzeros"])).T  # [N, K / G]
        scales = _np(staged["scales"]).astype(np.float32).T
        size = layer.shards[shard][1]
        if codes.shape != (size, k) or scales.shape != (size, -(-k // group)):
            raise ValueError(
                f"AWQ tensors of shard {shard!r} have shapes {codes.shape}, {scales.shape}; "
                f"expected {(size, k)} and {(size, -(-k // group))}"
            )
        bc = (
            affine_codes(codes, zeros, scales, group)
            if group % BLOCK == 0 and k % group == 0
            else None
        )
        if bc is None or self.config.method == "none":
            grp = np.arange(k) // group
            return torch.from_numpy((codes - zeros[:, grp]).astype(np.float32) * scales[:, grp])
        return bc
