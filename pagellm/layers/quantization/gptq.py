"""GPTQ: AutoGPTQ / GPTQModel checkpoints (4-bit), mapped onto the int4 kernels.

Per quantized Linear the checkpoint holds (K input, N output channels, group size G):

    qweight  int32 [K / 8, N]   8 codes per word along K, lowest bits first
    qzeros   int32 [groups, N / 8]  packed the same way along N; checkpoint_format
             "gptq" (v1, the default) stores zero - 1, "gptq_v2" the zero itself
    scales   fp16  [groups, N]
    g_idx    int32 [K]          the group of input channel k (act-order permutes it)
    w[n, k] = (code[n, k] - zero[n, g_idx[k]]) * scale[n, g_idx[k]]

With act-order the groups are scattered over the input channels: the input channels
are sorted by group once at load (``perm``), so each group is a run of whole blocks of
32, and the layer gathers x[:, perm] before the kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from pagellm.layers.quantization.awq import _np
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


def unpack_gptq_words(words: np.ndarray, axis: int) -> np.ndarray:
    """int32 words -> 4-bit codes, 8 per word along ``axis`` (0: rows, 1: columns)."""
    u = words.astype(np.int64) & 0xFFFFFFFF
    nib = (u[..., None] >> (4 * np.arange(8))) & 0xF  # [R, C, 8]
    if axis == 1:
        return nib.reshape(words.shape[0], -1)
    return nib.transpose(0, 2, 1).reshape(-1, words.shape[1])


def check_gptq_config(cfg: dict[str, Any]) -> tuple[int, str]:
    """(group size, checkpoint format) of a GPTQ quantization_config."""
    bits = int(cfg.get("bits", 4))
    fmt = str(cfg.get("checkpoint_format", cfg.get("format", "gptq"))).lower()
    if bits != 4:
        raise ValueError(f"GPTQ checkpoints with bits={bits} are not supported (only 4)")
    if cfg.get("is_marlin_format") or fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint format {fmt!r} is not supported (gptq, gptq_v2)")
    if str(cfg.get("pack_dtype", "int32")).replace("torch.", "") != "int32":
        raise ValueError("GPTQ checkpoints must pack into int32")
    return int(cfg.get("group_size", 128)), fmt


class GPTQLinearMethod(QuantizedLinearMethod):
    name = "gptq"
    required: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales")

    def slice_tensor(self, param_name: str, tensor: Any, rows: Span, cols: Span) -> Any:
        """Tensor-parallel parts of GPTQ's tensors. Output channels are columns (whole
        8-channel words in qzeros). Input channels: qweight rows in words of 8 and g_idx
        entries; with groups in order the scales and zeros keep this rank's groups (g_idx
        renumbered from 0), with act-order they stay whole (g_idx indexes them all)."""
        if param_name not in ("qweight", "qzeros", "scales", "g_idx"):
            return super().slice_tensor(param_name, tensor, rows, cols)
        t = _np(tensor)
        if rows is not None and param_name != "g_idx":
            t = t[:, packed_span(rows, 8 if param_name == "qzeros" else 1, f"GPTQ {param_name}")]
        if cols is not None:
            start, size = cols
            group, _ = check_gptq_config(self.config.checkpoint)
            in_order = (
                not self.config.checkpoint.get("desc_act")
                and group > 0
                and start % group == 0
                and size % group == 0
            )
            if param_name == "qweight":
                t = t[packed_span(cols, 8, "GPTQ qweight (words of the input)")]
            elif param_name == "g_idx":
                t = t[start : start + size].astype(np.int64)
                if in_order:
                    t = t - start // group  # renumbered with this rank's scales and zeros
            elif in_order:
                t = t[start // group : (start + size) // group]
        return np.ascontiguousarray(t)

    def load(self, layer: Linear, param_name: str, tensor: Any, shard: str) -> None:
        if param_name == "g_idx":
            layer.staged[shard]["g_idx"] = tensor
            return
        super().load(layer, param_name, tensor, shard)

    def to_codes(self, layer: Linear, shard: str, staged: dict[str, Any]) -> ShardWeight:
        if "weight" in staged:
            return as_float_tensor(staged["weight"])
        k = layer.in_features
        group, fmt = check_gptq_config(self.config.checkpoint)
        group = k if group in (-1, 0) else group
        codes = unpack_gptq_words(_np(staged["qweight"]), axis=0).T  # [N, K]
        zeros = unpack_gptq_words(_np(staged["qzeros"]), axis=1)  # [groups, N]
        if fmt == "gptq":
            zeros = (zeros + 1) & 0xF  # v1 stores zero - 1 per field
        zeros = zeros.T
        scales = _np(staged["scales"]).astype(np.float32).T  # [N, groups]
        n_groups = scales.shape[1]
        size = layer.shards[shard][1]
        if codes.shape != (size, k) or zeros.shape[1] < n_groups:
            raise ValueError(
                f"GPTQ tensors of shard {shard!r} have shapes {codes.shape}, {scales.shape}; "
                f"expected ({size}, {k}) codes"
            )
        zeros = zeros[:, :n_groups]
        g_idx = (
            _np(staged["g_idx"]).astype(np.int64) if "g_idx" in staged else np.arange(k) // group
        )
        if g_idx.shape != (k,) or g_idx.min() < 0 or g_idx.max() >= n_groups:
            raise ValueError(
                f"GPTQ g_idx of shard {shard!r} is not a group index per input channel"
            )
        if self.config.method == "none":
            return torch.from_numpy((codes - zeros[:, g_idx]).astype(np.float32) * scales[:, g_idx])
        perm = None
        if not np.array_equal(g_idx, np.arange(k) // group):
            perm = np.argsort(g_idx, kind="stable")
            codes, g_idx = codes[:, perm], g_idx[perm]
        first = g_idx[::BLOCK]
        if k % BLOCK or not all((g_idx.reshape(-1, BLOCK) == first[:, None]).all(axis=1)):
            # A group boundary inside a block of 32: no kernel; use the float weights.
            w = (codes - zeros[:, g_idx]).astype(np.float32) * scales[:, g_idx]
            if perm is not None:
                w = w[:, np.argsort(perm)]
            return torch.from_numpy(np.ascontiguousarray(w))
        s = scales[:, first]
        bc = BlockCodes(codes.astype(np.uint8), s, -zeros[:, first].astype(np.float32) * s, "u4")
        return bc if perm is None else (bc, perm)
