"""Quantized matmul kernels and the formats that feed them, on every instruction set this
CPU runs (AVX2 everywhere; AVX-512 with VNNI where present).

Error bounds, per output y[m, n] = sum_k x[m, k] w[n, k]:
- against the dequantized activations (xq * dx) and dequantized weights the kernel is
  exact up to float32 rounding: the block dot products are integer, then one float scale
  per block (relative 1e-5 of the output's magnitude);
- against the float activations, the only extra error is the activations' rounding to
  int8: at most half a step (dx / 2) per element, so |error| <= sum over blocks of
  dx[m, b] / 2 * sum_{k in b} |w[n, k]|, checked output by output, for every type.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import pytest
import torch

from pagellm.layers import native
from pagellm.layers.quantization.gguf import DECODERS, GGUFRawTensor, decode
from pagellm.layers.quantization.int4 import quantize_int4
from pagellm.layers.quantization.int8 import quantize_int8
from pagellm.layers.quantization.packed import (
    BlockCodes,
    PackedWeight,
    QuantizedActivations,
)

ISAS = native.supported_isas()
FORMATS = [
    ("u4", 1, True), ("u4", 1, False), ("u4s", 1, True), ("u4s", 1, False),
    ("u8", 1, True), ("u8", 1, False),
    ("s8", 1, True), ("s8", 1, False), ("s8", 2, False),
]  # fmt: skip
RANGES = {"s8": (-128, 127), "u8": (0, 63), "u4": (0, 15), "u4s": (0, 15)}


@pytest.fixture(params=ISAS)
def lib(request: Any) -> ctypes.CDLL:
    built = native.load(request.param)
    assert built is not None
    return built


def random_codes(n: int, k: int, kind: str, nsub: int, f16: bool, seed: int = 0) -> BlockCodes:
    """Random codes of a tile kind (u4s: u4 codes whose mins are -8 * scale, as Q4_0's)."""
    rng = np.random.default_rng(seed)
    lo, hi = RANGES[kind]
    codes = rng.integers(lo, hi + 1, size=(n, k)).astype(np.int8 if kind == "s8" else np.uint8)
    scales = (rng.random((n, k // 32 * nsub)) * 0.01 + 0.001).astype(np.float32)
    mins = None if kind == "s8" else (-rng.random(scales.shape) * 0.05).astype(np.float32)
    if f16:
        scales = scales.astype(np.float16).astype(np.float32)
        mins = None if mins is None else mins.astype(np.float16).astype(np.float32)
    else:  # make sure float16 would lose something, so the float32 layout is used
        scales[0, 0] = np.float32(0.0012345678)
    if kind == "u4s":
        return BlockCodes(codes, scales, -8 * scales, "u4", nsub)
    return BlockCodes(codes, scales, mins, kind, nsub)


def check_matmul(
    lib: ctypes.CDLL, bc: BlockCodes, x: torch.Tensor, bias: torch.Tensor | None
) -> None:
    pw = PackedWeight(bc, lib)
    xq = QuantizedActivations.of(x, lib)
    y = torch.empty(x.shape[0], bc.shape[0])
    pw.matmul_into(xq, y, bias)
    w = torch.from_numpy(bc.dequantize())
    b = 0 if bias is None else bias
    # 1. Exact up to float rounding against the dequantized operands.
    xdq = xq.q.float() * xq.d.repeat_interleave(32, dim=1)
    ref = xdq @ w.T + b
    torch.testing.assert_close(y, ref, atol=1e-5 * float(ref.abs().max()) + 1e-6, rtol=0)
    # 2. Against float activations: within the activation rounding bound, output by output.
    exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
    wabs = w.abs().double().view(w.shape[0], -1, 32).sum(-1)  # [N, blocks]
    bound = (xq.d.double() / 2) @ wabs.T  # [M, N]
    assert ((y.double() - exact).abs() <= bound * 1.0001 + 1e-4).all()


@pytest.mark.parametrize(("kind", "nsub", "f16"), FORMATS)
@pytest.mark.parametrize(("n", "k", "m"), [(13, 64, 1), (576, 576, 5), (40, 1536, 17)])
def test_packed_matmul(
    lib: ctypes.CDLL, kind: str, nsub: int, f16: bool, n: int, k: int, m: int
) -> None:
    bc = random_codes(n, k, kind, nsub, f16)
    pw = PackedWeight(bc, lib)
    assert pw.f16 == f16 and pw.kind == kind
    g = torch.Generator().manual_seed(n + k + m)
    check_matmul(lib, bc, torch.randn(m, k, generator=g), torch.randn(n, generator=g))


@pytest.mark.parametrize(("kind", "nsub", "f16"), FORMATS)
def test_dequantize_rows_is_exact(lib: ctypes.CDLL, kind: str, nsub: int, f16: bool) -> None:
    bc = random_codes(21, 96, kind, nsub, f16, seed=3)
    rows = torch.tensor([0, 20, 7, 7, 13])
    got = PackedWeight(bc, lib).dequantize_rows(rows)
    assert torch.equal(got, torch.from_numpy(bc.dequantize())[rows])


@pytest.mark.parametrize(("kind", "nsub", "f16"), FORMATS)
def test_packed_matmul_is_batch_invariant(
    lib: ctypes.CDLL, kind: str, nsub: int, f16: bool
) -> None:
    """A row's output is bit-identical whatever else is in the batch (and wherever the
    output slice sits in a wider tensor)."""
    bc = random_codes(45, 192, kind, nsub, f16, seed=5)
    pw = PackedWeight(bc, lib)
    x = torch.randn(70, 192, generator=torch.Generator().manual_seed(1))
    alone = torch.empty(1, 45)
    pw.matmul_into(QuantizedActivations.of(x[9:10], lib), alone, None)
    for m in (2, 3, 5, 9, 17, 70):
        lo = max(0, 9 - m + 1)
        wide = torch.empty(m, 60)
        out = wide[:, 10:55]
        pw.matmul_into(QuantizedActivations.of(x[lo : lo + m], lib), out, None)
        assert torch.equal(out[9 - lo], alone[0]), m


def test_activation_quantization(lib: ctypes.CDLL) -> None:
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(2)) * 3
    x[2, 40:72] = 0  # an all-zero block
    wide = torch.cat([x, torch.ones(7, 16)], dim=1)[:, :128]  # a strided view
    xq = QuantizedActivations.of(wide, lib)
    blocks = x.view(7, 4, 32)
    d = blocks.abs().amax(-1) / 127
    torch.testing.assert_close(xq.d, d)
    codes = torch.round(blocks / torch.where(d > 0, d, 1)[..., None]).clamp(-127, 127)
    assert torch.equal(xq.q.view(7, 4, 32).float(), codes)
    halves = codes.view(7, 4, 2, 16).sum(-1) * d[..., None]
    torch.testing.assert_close(xq.s.view(7, 4, 2), halves)


@pytest.mark.parametrize("qtype", sorted(DECODERS))
def test_every_gguf_kernel_type(lib: ctypes.CDLL, qtype: str) -> None:
    """Random blocks of each type: the decoded codes reproduce gguf-py's dequantization
    exactly, and the kernel's product is within the bounds above."""
    import gguf
    from gguf import quants

    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    n, k = 24, 512
    rng = np.random.default_rng(4)
    # Masking every byte to 0x3B keeps the float16 scale fields finite and small.
    raw = (rng.integers(0, 256, size=(n, k // block * size)) & 0x3B).astype(np.uint8)
    bc = decode(GGUFRawTensor("w", qtype, raw, (n, k)))
    assert np.array_equal(bc.dequantize(), quants.dequantize(raw, t))
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(5))
    check_matmul(lib, bc, x, None)


def test_gguf_q4_types_keep_float16_scales() -> None:
    """Q4_0 / Q4_1 / Q8_0 repack without growing: their fp16 scales (and Q4_0's -8 d)
    are exact in float16, so the packed bytes per weight equal the file's."""
    import gguf
    from gguf import quants

    w = np.random.default_rng(6).standard_normal((16, 256)).astype(np.float32)
    for qtype, stored_bpw in (("Q4_0", 4.5), ("Q4_1", 5.0), ("Q8_0", 8.5)):
        raw = quants.quantize(w, gguf.GGMLQuantizationType[qtype])
        bc = decode(GGUFRawTensor("w", qtype, raw, w.shape))
        assert bc._f16()
        packed_bpw = bc.nbytes_stored * 8 / w.size
        assert packed_bpw == pytest.approx(stored_bpw)


@pytest.mark.parametrize("f16", [True, False])
def test_q4_0_min_is_implied_not_stored(lib: ctypes.CDLL, f16: bool) -> None:
    """u4 codes whose mins are -8 * scale pack as u4s (the min computed in the kernel,
    not read): 10% fewer bytes with float16 scales, and the same outputs to the bit as
    the u4 tiles."""
    bc = random_codes(40, 1536, "u4s", 1, f16, seed=9)
    folded, stored = PackedWeight(bc, lib), PackedWeight(bc, lib, kind="u4")
    ssz = 2 if f16 else 4
    assert folded.kind == "u4s"
    assert folded.nbytes * (128 + 16 * ssz) == stored.nbytes * (128 + 8 * ssz)
    x = torch.randn(17, 1536, generator=torch.Generator().manual_seed(2))
    assert torch.equal(folded(x), stored(x))
    rows = torch.tensor([0, 39, 8])
    assert torch.equal(folded.dequantize_rows(rows), stored.dequantize_rows(rows))


def test_int8_and_int4_quantizers() -> None:
    w = np.random.default_rng(7).standard_normal((10, 256)).astype(np.float32)
    w[3, 5] = 9.0
    bc8 = quantize_int8(w)
    scale = np.abs(w).max(1) / 127
    assert (np.abs(bc8.dequantize() - w) <= scale[:, None] / 2 + 1e-6).all()
    for group in (32, 128):
        bc4 = quantize_int4(w, group)
        g = w.reshape(10, -1, group)
        step = (g.max(-1) - g.min(-1)) / 15
        plain = np.clip(np.rint((g - g.min(-1, keepdims=True)) / step[..., None]), 0, 15)
        plain_err = ((plain * step[..., None] + g.min(-1, keepdims=True) - g) ** 2).sum(-1)
        err = ((bc4.dequantize() - w).reshape(10, -1, group) ** 2).sum(-1)
        # least-squares refinement: never worse than min/max rounding, usually better
        assert (err <= plain_err * (1 + 1e-5) + 1e-9).all() and err.sum() < plain_err.sum()
