"""GGUF tensors kept quantized: each llama.cpp block type decoded into ``BlockCodes``.

The decoders below turn a tensor's raw blocks ([N, bytes per row] uint8) into codes,
scales and mins that reproduce gguf-py's own dequantization (tests check every type
against ``gguf.quants.dequantize``):

    type   block                          codes            scale per 32 (or 16)   min
    Q4_0   d f16, 16 B nibbles            u4 q             d                      -8 d
    Q4_1   d, m f16, 16 B nibbles         u4 q             d                      m
    Q5_0   d f16, 4 B high bits, 16 B     s8 q - 16        d                      -
    Q5_1   d, m f16, 4 B high bits, 16 B  u8 q             d                      m
    Q8_0   d f16, 32 x int8               s8 q             d                      -
    Q4_K   256: d, dmin f16, 12 B 6-bit   u4 q             d * sc[j]              -dmin * m[j]
           scales/mins, 128 B nibbles
    Q5_K   Q4_K + 32 B high bits          u8 q             d * sc[j]              -dmin * m[j]
    Q6_K   256: 128 B low nibbles, 64 B   s8 q - 32        d * sc[j] per 16       -
           high 2 bits, 16 x int8 sc, d   (nsub = 2)

Any other type (Q2_K, Q3_K, IQ*, TQ*, MXFP4, float) has no kernel: it is dequantized to
the run dtype by ``dequantize_tensor`` (logged once per type).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pagellm.layers.quantization.base import QuantizedLinearMethod, ShardWeight, as_float_tensor
from pagellm.layers.quantization.packed import BlockCodes

if TYPE_CHECKING:
    from pagellm.layers.linear import Linear

logger = logging.getLogger(__name__)


# Plain numeric tensor types gguf-py reads as numpy arrays but does not "dequantize".
PLAIN_TYPES = ("F64", "I8", "I16", "I32", "I64")


def dequantize_tensor(name: str, data: np.ndarray, tensor_type: Any) -> np.ndarray:
    """float32 values of a GGUF tensor of any type gguf-py can dequantize (F32, F16, BF16,
    Q4_0 ... Q8_0, the K-quants, the IQ types, TQ, MXFP4, ...) or read as plain numbers;
    a ValueError names the tensor and the type otherwise."""
    from gguf import quants

    try:
        return np.asarray(quants.dequantize(data, tensor_type), dtype=np.float32)
    except NotImplementedError:
        if tensor_type.name in PLAIN_TYPES:
            return np.asarray(data, dtype=np.float32)
        raise ValueError(
            f"GGUF tensor {name} has type {tensor_type.name}, which gguf-py {_gguf_version()} "
            "cannot dequantize; convert the file to another type (llama-quantize)"
        ) from None


def _gguf_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        return "?"


@dataclass
class GGUFRawTensor:
    """A quantized GGUF matrix as stored: [N rows, bytes per row] of blocks along K."""

    name: str
    qtype: str
    data: np.ndarray
    shape: tuple[int, int]

    def dequantize(self) -> np.ndarray:
        import gguf

        arr = dequantize_tensor(self.name, self.data, gguf.GGMLQuantizationType[self.qtype])
        return arr.reshape(self.shape)


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> [...] float32."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: low nibbles first, then high (llama.cpp order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """[..., 4] bytes -> [..., 32] bits, little-endian bit order."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _blocks(data: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    n = data.shape[0]
    return data.reshape(n, -1, size), n


def _q4_0(data: np.ndarray) -> BlockCodes:
    b, n = _blocks(data, 18)
    d = _f16(b[..., 0:2])
    codes = _nibbles(b[..., 2:18]).reshape(n, -1)
    return BlockCodes(codes, d, -8 * d, "u4")


def _q4_1(data: np.ndarray) -> BlockCodes:
    b, n = _blocks(data, 20)
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    return BlockCodes(_nibbles(b[..., 4:20]).reshape(n, -1), d, m, "u4")


def _q5_0(data: np.ndarray) -> BlockCodes:
    b, n = _blocks(data, 22)
    d = _f16(b[..., 0:2])
    q = _nibbles(b[..., 6:22]) | (_high_bits(b[..., 2:6]) << 4)
    return BlockCodes((q.astype(np.int16) - 16).astype(np.int8).reshape(n, -1), d, None, "s8")


def _q5_1(data: np.ndarray) -> BlockCodes:
    b, n = _blocks(data, 24)
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    q = _nibbles(b[..., 8:24]) | (_high_bits(b[..., 4:8]) << 4)
    return BlockCodes(q.reshape(n, -1), d, m, "u8")


def _q8_0(data: np.ndarray) -> BlockCodes:
    b, n = _blocks(data, 34)
    d = _f16(b[..., 0:2])
    return BlockCodes(
        np.ascontiguousarray(b[..., 2:34]).view(np.int8).reshape(n, -1), d, None, "s8"
    )


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block."""
    lo, hi, mix = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_affine(b: np.ndarray, n: int, q: np.ndarray, kind: str) -> BlockCodes:
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k_scales(b[..., 4:16])
    scales = (d[..., None] * sc).reshape(n, -1)
    mins = -(dmin[..., None] * mn).reshape(n, -1)
    return BlockCodes(q.reshape(n, -1), scales, mins, kind)


def _q4_k(data: np.ndarray) -> BlockCodes:
    b, n = _blocks(data, 144)
    # 4 chunks of 32 bytes: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1.
    qs = b[..., 16:144].reshape(n, -1, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=3)  # [n, sb, chunk, 2, 32]
    return _k_affine(b, n, q, "u4")


def _q5_k(data: np.ndarray) -> BlockCodes:
    b, n = _blocks(data, 176)
    qs = b[..., 48:176].reshape(n, -1, 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, -1, 8, 32)
    qh = b[..., 16:48]  # bit j of byte i: high bit of value i of sub-block j
    high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [n, sb, 8, 32]
    return _k_affine(b, n, low | (high << 4), "u8")


def _q6_k(data: np.ndarray) -> BlockCodes:
    b, n = _blocks(data, 210)
    ql = b[..., 0:128].reshape(n, -1, 2, 64)  # two halves of 128 values
    qh = b[..., 128:192].reshape(n, -1, 2, 32)
    sc = b[..., 192:208].view(np.int8).astype(np.float32)  # [n, sb, 16]
    d = _f16(b[..., 208:210])
    # Half h holds values h*128 + [0..127]: 4 runs of 32; run r takes nibble (r // 2) of
    # ql bytes [(r % 2) * 32 ...] and bits 2r..2r+1 of the 32 qh bytes.
    low = np.stack(
        [ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=3
    )
    high = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=3)
    q = (low | (high << 4)).astype(np.int16) - 32  # [n, sb, 2, 4, 32]
    scales = (d[..., None] * sc).reshape(n, -1)
    return BlockCodes(q.astype(np.int8).reshape(n, -1), scales, None, "s8", nsub=2)


DECODERS: dict[str, Callable[[np.ndarray], BlockCodes]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def decode(raw: GGUFRawTensor) -> BlockCodes:
    """The block codes of a raw GGUF matrix whose type has a kernel (see DECODERS)."""
    bc = DECODERS[raw.qtype](raw.data)
    assert bc.shape == raw.shape, (raw.name, bc.shape, raw.shape)
    return bc


@functools.cache
def _log_no_kernel(qtype: str) -> None:
    logger.info("GGUF type %s has no quantized kernel: its tensors are dequantized", qtype)


class GGUFLinearMethod(QuantizedLinearMethod):
    """GGUF blocks kept as stored (repacked for the kernels); other types dequantized."""

    name = "gguf"

    def to_codes(self, layer: Linear, shard: str, staged: dict[str, Any]) -> ShardWeight:
        t = staged["weight"]
        if isinstance(t, GGUFRawTensor):
            if t.qtype in DECODERS:
                return decode(t)
            _log_no_kernel(t.qtype)
        return as_float_tensor(t)
