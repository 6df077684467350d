"""Block codes and the packed weights the quantized kernels read.

Every quantization method ends in the same place: ``BlockCodes``, an [N, K] matrix of
small integer codes with a scale (and for unsigned codes a min) per block of 32 input
channels (two per block with ``nsub=2``), so that

    w[n, k] = scale[n, k // (32 / nsub)] * code[n, k] (+ min[n, k // (32 / nsub)])

exactly equals the checkpoint's own dequantization. ``pack()`` turns it into the layout
of pagellm/csrc/quant_ops.c (rows interleaved 8 at a time; see there) when the native
kernels are loaded; elsewhere (CUDA, no compiler) it keeps codes, scales and mins as
torch tensors and dequantizes per call (``TorchPackedWeight``).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

KINDS = {"s8": 0, "u8": 1, "u4": 2, "u4s": 3}
"""Tile kinds of quant_ops.c; u4s (u4 whose min is -8 * scale, not stored) is chosen
at packing, never named by a BlockCodes."""
# Code ranges each kind's kernel is exact for (see quant_ops.c).
_CODE_RANGE = {"s8": (-128, 127), "u8": (0, 63), "u4": (0, 15)}
BLOCK = 32
GROUP_ROWS = 8


@dataclass
class BlockCodes:
    codes: np.ndarray
    """[N, K] uint8 (u4, u8) or int8 (s8)."""
    scales: np.ndarray
    """[N, K // 32 * nsub] float32."""
    mins: np.ndarray | None
    """Like scales for u4/u8; None for s8."""
    kind: str
    nsub: int = 1

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        assert self.kind in KINDS and self.nsub in (1, 2), (self.kind, self.nsub)
        assert k % BLOCK == 0, k
        assert self.scales.shape == (n, k // BLOCK * self.nsub), (self.scales.shape, n, k)
        assert (self.mins is None) == (self.kind == "s8")
        lo, hi = _CODE_RANGE[self.kind]
        if self.codes.size:
            assert lo <= int(self.codes.min()) and int(self.codes.max()) <= hi, self.kind

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def format(self) -> tuple[str, int]:
        return (self.kind, self.nsub)

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: scale * code (+ min), in that order."""
        rep = BLOCK // self.nsub
        s = np.repeat(self.scales, rep, axis=1)
        out = s * self.codes.astype(np.float32)
        if self.mins is not None:
            out += np.repeat(self.mins, rep, axis=1)
        return out

    @staticmethod
    def concat(parts: list[BlockCodes]) -> BlockCodes:
        """Stack row-wise (merged q/k/v or gate/up shards of one format)."""
        first = parts[0]
        assert all(p.format == first.format for p in parts)
        return BlockCodes(
            np.concatenate([p.codes for p in parts]),
            np.concatenate([p.scales for p in parts]),
            None if first.mins is None else np.concatenate([p.mins for p in parts]),  # type: ignore[misc]
            first.kind,
            first.nsub,
        )

    @property
    def nbytes_stored(self) -> int:
        """Bytes of the packed layout (what a step reads)."""
        n, k = self.shape
        groups = -(-n // GROUP_ROWS)
        return groups * (k // BLOCK) * tile_bytes(self.packed_kind(), self.nsub, self._f16())

    def packed_kind(self) -> str:
        """The tile kind: u4 codes whose mins are exactly -8 * scale (Q4_0, symmetric
        int4) pack as u4s, with the mins implied."""
        if (
            self.kind == "u4"
            and self.mins is not None
            and np.array_equal(self.mins, -8 * self.scales)
        ):
            return "u4s"
        return self.kind

    def _f16(self) -> bool:
        """Scales and mins are stored as float16 when that loses nothing."""
        arrays = [self.scales] + ([self.mins] if self.mins is not None else [])
        return all(np.array_equal(a.astype(np.float16).astype(np.float32), a) for a in arrays)


def tile_bytes(kind: str, nsub: int, f16: bool) -> int:
    codes = 128 if kind in ("u4", "u4s") else 256
    return codes + nsub * GROUP_ROWS * (2 if f16 else 4) * (2 if kind in ("u4", "u8") else 1)


def pack_tiles(bc: BlockCodes, kind: str | None = None) -> tuple[np.ndarray, bool]:
    """The row-interleaved tile layout of quant_ops.c for tile ``kind`` (default: the
    codes' packed kind), and whether scales are float16."""
    kind = kind or bc.packed_kind()
    n, k = bc.shape
    nb = k // BLOCK
    groups = -(-n // GROUP_ROWS)
    pad = groups * GROUP_ROWS - n
    f16 = bc._f16()
    codes = bc.codes.view(np.uint8)
    if pad:
        codes = np.concatenate([codes, np.zeros((pad, k), np.uint8)])
    # [G, 8 rows, NB, 8 quads, 4] -> [G, NB, quad, row, 4]
    q: np.ndarray = codes.reshape(groups, GROUP_ROWS, nb, 8, 4).transpose(0, 2, 3, 1, 4)
    if bc.kind == "u4":
        q = q[:, :, :4] | (q[:, :, 4:] << 4)
    parts = [q.reshape(groups, nb, -1)]
    sdt = np.float16 if f16 else np.float32
    mins = [bc.mins] if bc.mins is not None and kind != "u4s" else []
    for arr in [bc.scales, *mins]:
        a = arr.astype(sdt)
        if pad:
            a = np.concatenate([a, np.zeros((pad, a.shape[1]), sdt)])
        # [G, 8, NB, nsub] -> [G, NB, nsub, 8]
        a = a.reshape(groups, GROUP_ROWS, nb, bc.nsub).transpose(0, 2, 3, 1)
        parts.append(np.ascontiguousarray(a).view(np.uint8).reshape(groups, nb, -1))
    tiles = np.concatenate(parts, axis=2)
    assert tiles.shape[2] == tile_bytes(kind, bc.nsub, f16)
    return np.ascontiguousarray(tiles).reshape(-1), f16


class _QWeightDesc(ctypes.Structure):
    """pagellm_qweight in quant_ops.c: what a call needs besides x and y."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("kind", ctypes.c_int32),
        ("nsub", ctypes.c_int32),
        ("f16", ctypes.c_int32),
        ("pad_", ctypes.c_int32),
        ("bias", ctypes.c_void_p),
    ]


class PackedWeight:
    """A quantized [N, K] matrix as the native kernels read it."""

    def __init__(
        self,
        bc: BlockCodes,
        lib: ctypes.CDLL,
        bias: torch.Tensor | None = None,
        kind: str | None = None,
    ) -> None:
        kind = kind or bc.packed_kind()
        tiles, f16 = pack_tiles(bc, kind)
        self.data = torch.from_numpy(tiles)
        self.n, self.k = bc.shape
        self.kind, self.nsub, self.f16 = kind, bc.nsub, f16
        self._kind_id = KINDS[kind]
        self._lib = lib
        # The bias (a slice of the layer's) and the tiles never move once loaded.
        self._bias = bias
        self._desc = _QWeightDesc(
            self.data.data_ptr(), self.n, self.k, self._kind_id, bc.nsub, int(f16), 0,
            None if bias is None else bias.data_ptr(),
        )  # fmt: skip
        self._desc_ref = ctypes.byref(self._desc)
        self._call = lib.pagellm_qlinear_f32

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x[M, K] float32 (rows may be strided) @ w^T + bias, into ``out`` (which may be a
        column slice of a wider tensor) or a new [M, N] tensor. Activations are quantized
        inside the call."""
        if x.stride(1) != 1:
            x = x.contiguous()
        m = x.shape[0]
        if out is None:
            out = torch.empty((m, self.n), dtype=torch.float32)
        self._call(
            x.data_ptr(), x.stride(0), m, out.data_ptr(), out.stride(0), self._desc_ref,
            torch.get_num_threads(),
        )  # fmt: skip
        return out

    def matmul_into(
        self, xq: QuantizedActivations, y: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        """y[:, :] = x @ w^T (+ bias); y may be a column slice of a wider output."""
        assert y.stride(1) == 1 and y.shape == (xq.m, self.n) and xq.k == self.k
        self._lib.pagellm_qlinear(
            xq.q.data_ptr(), xq.d.data_ptr(), xq.s.data_ptr(), xq.m, self.k, self.data.data_ptr(),
            self.n, self._kind_id, self.nsub, int(self.f16), y.data_ptr(), y.stride(0),
            None if bias is None else bias.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(torch.int64).contiguous()
        out = torch.empty((rows.numel(), self.k), dtype=torch.float32)
        self._lib.pagellm_q_dequant_rows(
            self.data.data_ptr(), self.k, self._kind_id, self.nsub, int(self.f16),
            rows.data_ptr(), rows.numel(), out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out


@dataclass
class QuantizedActivations:
    """x[M, K] as int8 blocks of 32: codes, a scale per block, scaled half-block sums."""

    q: torch.Tensor
    d: torch.Tensor
    s: torch.Tensor
    m: int
    k: int

    @staticmethod
    def of(x: torch.Tensor, lib: ctypes.CDLL) -> QuantizedActivations:
        m, k = x.shape
        assert x.dtype == torch.float32 and x.stride(1) == 1 and k % BLOCK == 0
        q = torch.empty((m, k), dtype=torch.int8)
        d = torch.empty((m, k // BLOCK), dtype=torch.float32)
        s = torch.empty((m, 2 * (k // BLOCK)), dtype=torch.float32)
        lib.pagellm_quantize_q8(
            x.data_ptr(), x.stride(0), m, k, q.data_ptr(), d.data_ptr(), s.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return QuantizedActivations(q, d, s, m, k)


class TorchPackedWeight:
    """The same matrix for the torch path (CUDA, or no native kernels): codes, scales and
    mins as tensors on the device, dequantized to the run dtype on every call."""

    def __init__(self, bc: BlockCodes, device: torch.device, dtype: torch.dtype) -> None:
        self.n, self.k = bc.shape
        self.kind, self.nsub = bc.kind, bc.nsub
        self.codes = torch.from_numpy(np.ascontiguousarray(bc.codes)).to(device)
        self.scales = torch.from_numpy(bc.scales).to(device)
        self.mins = None if bc.mins is None else torch.from_numpy(bc.mins).to(device)
        self.dtype = dtype

    @property
    def nbytes(self) -> int:
        mins = 0 if self.mins is None else self.mins.numel() * 4
        return int(self.codes.numel() + self.scales.numel() * 4 + mins)

    def dequantize(self) -> torch.Tensor:
        rep = BLOCK // self.nsub
        w = self.codes.float() * self.scales.repeat_interleave(rep, dim=1)
        if self.mins is not None:
            w += self.mins.repeat_interleave(rep, dim=1)
        return w.to(self.dtype)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        rep = BLOCK // self.nsub
        w = self.codes[rows].float() * self.scales[rows].repeat_interleave(rep, dim=1)
        if self.mins is not None:
            w += self.mins[rows].repeat_interleave(rep, dim=1)
        return w.to(self.dtype)
