"""pagellm's compiled CPU kernels against their torch twins, on every instruction set
this CPU supports (AVX2 everywhere; AVX-512 where present): each test runs once per
build, so a machine of either kind checks every path it can run."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from pagellm.layers import native, ops
from pagellm.layers.attention import (
    KV_CACHE_DTYPES,
    AttentionMetadata,
    AttentionSpec,
    CpuNativeAttentionBackend,
    LayerKVCache,
    TorchAttentionBackend,
)
from pagellm.layers.rotary import RotaryEmbedding

ISAS = native.supported_isas()


@pytest.fixture(params=ISAS)
def lib(request: Any) -> ctypes.CDLL:
    built = native.load(request.param)
    assert built is not None, f"the {request.param} kernels did not build"
    return built


def test_kernels_build_on_this_machine() -> None:
    # CI and development machines have AVX2, FMA, F16C and a C compiler: the fast path
    # must exist, and the default build is the best one the CPU supports.
    assert "avx2" in ISAS
    best = native.load()
    assert best is not None and best.pagellm_isa().decode() == ISAS[0]


def test_builds_are_cached_per_instruction_set(monkeypatch: pytest.MonkeyPatch) -> None:
    paths = {isa: native.load(isa)._name for isa in ISAS}  # type: ignore[union-attr]
    assert len(set(paths.values())) == len(ISAS)
    for isa, path in paths.items():
        assert f"/{isa}-" in path
    monkeypatch.setenv("PAGELLM_CPU_ISA", "avx2")
    assert native.default_isa() == "avx2"
    monkeypatch.setenv("PAGELLM_CPU_ISA", "sse2")
    with pytest.raises(ValueError, match="PAGELLM_CPU_ISA='sse2' is not supported"):
        native.default_isa()


def test_a_cpu_without_avx2_gets_no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "cpu_features", lambda: frozenset({"sse2", "avx"}))
    assert native.supported_isas() == []
    assert native.load() is None


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 31, 64])
@pytest.mark.parametrize(("N", "K"), [(576, 576), (13, 40), (1539, 576), (7, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear(lib: ctypes.CDLL, M: int, N: int, K: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    torch.testing.assert_close(
        ops.linear(x, w, b, lib), torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4
    )
    # A strided view (q of a fused qkv row) works too.
    wide = torch.randn(M, K + 64, generator=g)
    view = wide[:, 32 : 32 + K]
    torch.testing.assert_close(
        ops.linear(view, w, b, lib), torch.nn.functional.linear(view, w, b), atol=1e-4, rtol=1e-4
    )


def test_rms_norm_with_and_without_residual(lib: ctypes.CDLL) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(17, 576, generator=g)
    w = torch.randn(576, generator=g)
    res = torch.randn(17, 576, generator=g)
    out, r = ops.rms_norm(x, w, 1e-5, None, lib)
    ref, _ = ops.rms_norm(x, w, 1e-5, None, None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert r is x
    res_native = res.clone()
    out, r = ops.rms_norm(x, w, 1e-5, res_native, lib)
    ref, ref_r = ops.rms_norm(x, w, 1e-5, res.clone(), None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r, ref_r)


def test_silu_and_mul(lib: ctypes.CDLL) -> None:
    x = torch.randn(9, 2 * 1536) * 4
    torch.testing.assert_close(
        ops.silu_and_mul(x, lib), ops.silu_and_mul(x, None), atol=1e-5, rtol=1e-5
    )


def test_rope_in_place_on_strided_views(lib: ctypes.CDLL) -> None:
    from pagellm.layers import ops as ops_mod

    positions = torch.tensor([0, 5, 17, 1000, 3], dtype=torch.long)
    with ops_mod.use_native_kernels(lib):
        native_rope = RotaryEmbedding(64, 64, 2048, 10000.0)
    torch_rope = RotaryEmbedding(64, 64, 2048, 10000.0)
    qkv = torch.randn(5, (9 + 3 + 3) * 64)
    q_ref, k_ref = torch_rope(positions, qkv[:, : 9 * 64].clone(), qkv[:, 9 * 64 : 12 * 64].clone())
    q, k = native_rope(positions, qkv[:, : 9 * 64], qkv[:, 9 * 64 : 12 * 64])
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)


def _mixed_batch(block_size: int) -> tuple[list[int], list[int], list[list[int]], int]:
    """q_lens, seq_lens and shuffled block tables of a prefill/decode/chunk mix."""
    q_lens = [7, 1, 1, 20, 1]
    seq_lens = [7, 40, 1, 33, 129]  # chunk of 20 after 13 cached; decode at 129
    rng = np.random.default_rng(0)
    need = [-(-s // block_size) for s in seq_lens]
    perm = rng.permutation(sum(need) + 5).tolist()
    tables, i = [], 0
    for n in need:
        tables.append(perm[i : i + n])
        i += n
    return q_lens, seq_lens, tables, sum(need) + 5


def _cache_of(values_k: torch.Tensor, values_v: torch.Tensor, kv_dtype: str) -> LayerKVCache:
    """A cache of ``kv_dtype`` holding the given float contents (quantized by torch)."""
    shape = values_k.shape
    dtype = KV_CACHE_DTYPES[kv_dtype]
    scales = [torch.zeros(shape[:3]) for _ in range(2)] if kv_dtype == "int8" else [None, None]
    cache = LayerKVCache(
        torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), *scales, dtype=kv_dtype
    )
    slots = torch.arange(shape[0] * shape[1])
    cache.write(slots, values_k.view(-1, *shape[2:]), values_v.view(-1, *shape[2:]))
    return cache


def _clone(cache: LayerKVCache) -> LayerKVCache:
    return LayerKVCache(
        *(
            None if t is None else t.clone()
            for t in (cache.k, cache.v, cache.k_scale, cache.v_scale)
        ),
        dtype=cache.dtype,
    )  # type: ignore[arg-type]


SPECS = {
    "full": AttentionSpec(),
    "window": AttentionSpec(sliding_window=20),
    "softcap": AttentionSpec(logit_softcap=3.0),
    "window+softcap": AttentionSpec(sliding_window=7, logit_softcap=2.0),
}


_HEADS = [(9, 3, 64), (4, 4, 32), (8, 1, 64), (10, 2, 128)]
_KV = ["float32", "bfloat16", "fp8_e4m3", "int8"]
# Every head layout and KV dtype for full attention; the other layer kinds on two layouts
# and the float32 / int8 caches (the read path is shared by every dtype).
_CASES = [(*h, kv, "full") for h in _HEADS for kv in _KV] + [
    (*h, kv, kind) for h in _HEADS[:2] for kv in ("float32", "int8") for kind in list(SPECS)[1:]
]


@pytest.mark.parametrize(("Hq", "Hkv", "D", "kv_dtype", "kind"), _CASES)
def test_paged_attention_matches_torch_backend(
    lib: ctypes.CDLL, Hq: int, Hkv: int, D: int, kv_dtype: str, kind: str
) -> None:
    """The C kernel and the torch backend write the same cache bytes (every KV dtype) and
    attend to the same result; in float32 both equal plain attention over the context,
    for every layer kind (sliding window, logit soft-cap). Blocks wholly behind a
    window hold NaN (as freed blocks may hold anything): neither backend may read them."""
    spec = SPECS[kind]
    bs = 16
    q_lens, seq_lens, tables, num_blocks = _mixed_batch(bs)
    T = sum(q_lens)
    qsl = np.concatenate([[0], np.cumsum(q_lens)])
    max_blocks = max(len(t) for t in tables)
    bt = np.zeros((len(q_lens), max_blocks), dtype=np.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = t
    positions = np.concatenate([np.arange(s - q, s) for q, s in zip(q_lens, seq_lens)])
    rows = np.repeat(np.arange(len(q_lens)), q_lens)
    slots = bt[rows, positions // bs].astype(np.int64) * bs + positions % bs
    g = torch.Generator().manual_seed(1)
    k_cache = torch.randn(num_blocks, bs, Hkv, D, generator=g)
    v_cache = torch.randn(num_blocks, bs, Hkv, D, generator=g)
    start = _cache_of(k_cache, v_cache, kv_dtype)
    W = spec.sliding_window
    if W is not None and kv_dtype == "float32":
        for s, (ql, sl) in enumerate(zip(q_lens, seq_lens)):
            for b in tables[s][: max(sl - ql + 1 - W, 0) // bs]:
                start.k[b] = float("nan")
                start.v[b] = float("nan")
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    outs, caches = {}, {}
    backends = {"cpu_native": CpuNativeAttentionBackend(lib), "torch": TorchAttentionBackend()}
    for name, backend in backends.items():
        meta = AttentionMetadata(
            T, len(q_lens), bs, torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32),
            torch.from_numpy(bt), torch.from_numpy(slots), max(q_lens), max(seq_lens), qsl,
            np.array(seq_lens), backend,
        )  # fmt: skip
        meta.backend_data = backend.prepare(meta)
        caches[name] = cache = _clone(start)
        outs[name] = backend.forward(meta, q, k, v, cache, Hq, Hkv, D, D**-0.5, spec)
    for a, b in zip(caches["cpu_native"].tensors(), caches["torch"].tensors()):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    torch.testing.assert_close(outs["cpu_native"], outs["torch"], atol=2e-5, rtol=2e-5)
    if kv_dtype != "float32":
        return
    # The step's K/V landed in the cache at the slots.
    kc, vc = caches["torch"].k, caches["torch"].v
    torch.testing.assert_close(kc.view(-1, Hkv, D)[slots], k.reshape(T, Hkv, D))
    torch.testing.assert_close(vc.view(-1, Hkv, D)[slots], v.reshape(T, Hkv, D))
    # And both equal plain attention over the gathered context.
    G = Hq // Hkv
    for s, (ql, sl) in enumerate(zip(q_lens, seq_lens)):
        ctx_k = torch.cat([kc[b] for b in tables[s]])[:sl].repeat_interleave(G, dim=1)
        ctx_v = torch.cat([vc[b] for b in tables[s]])[:sl].repeat_interleave(G, dim=1)
        qs = q[qsl[s] : qsl[s + 1]].reshape(ql, Hq, D)
        keys, rows = torch.arange(sl)[None, :], torch.arange(sl - ql, sl)[:, None]
        allowed = keys <= rows
        if W is not None:
            allowed &= keys > rows - W
            seen = allowed.any(dim=0)[:, None, None]
            ctx_k, ctx_v = ctx_k.where(seen, 0.0), ctx_v.where(seen, 0.0)
        scores = torch.einsum("qhd,khd->hqk", qs, ctx_k) * D**-0.5
        if spec.logit_softcap is not None:
            scores = torch.tanh(scores / spec.logit_softcap) * spec.logit_softcap
        scores = scores.masked_fill(~allowed, float("-inf"))
        ref = torch.einsum("hqk,khd->qhd", scores.softmax(-1), ctx_v).reshape(ql, Hq * D)
        torch.testing.assert_close(
            outs["cpu_native"][qsl[s] : qsl[s + 1]], ref, atol=2e-5, rtol=2e-5
        )


@pytest.mark.parametrize(("N", "K"), [(576, 576), (13, 44), (1539, 1536)])
def test_linear_is_batch_invariant(lib: ctypes.CDLL, N: int, K: int) -> None:
    """A row's output is bit-identical whatever else is in the batch."""
    g = torch.Generator().manual_seed(N)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g)
    rows = torch.randn(300, K, generator=g)
    alone = ops.linear(rows[7:8], w, b, lib)
    for M in (2, 3, 4, 17, 300):
        batch = ops.linear(rows[7 - min(7, M - 1) : 7 - min(7, M - 1) + M], w, b, lib)
        assert torch.equal(batch[min(7, M - 1)], alone[0]), M


@pytest.fixture(params=["bf16-dot", "widened"])
def bf16_dot(lib: ctypes.CDLL, request: Any) -> Iterator[int]:
    """Each setting of the bf16 path (vdpbf16ps where the build has it, or weights widened
    to float32), restored afterwards."""
    before = lib.pagellm_has_bf16_dot()
    yield lib.pagellm_set_bf16_dot(int(request.param == "bf16-dot"))
    lib.pagellm_set_bf16_dot(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 5, 7, 13])
@pytest.mark.parametrize(("N", "K"), [(576, 576), (13, 44), (1539, 1536), (6, 70)])
def test_linear_half_weights(
    lib: ctypes.CDLL, bf16_dot: int, dtype: torch.dtype, M: int, N: int, K: int
) -> None:
    """16-bit weights, float32 arithmetic: equal to torch on the widened weights (and, on
    the vdpbf16ps path, on the input rounded to bf16), and batch invariant."""
    assert lib.pagellm_has_bf16_dot() == bf16_dot
    g = torch.Generator().manual_seed(M * 7 + N)
    x_full = torch.randn(M + 3, K, generator=g)
    x = x_full[:M]
    w = (torch.randn(N, K, generator=g) * 0.1).to(dtype)
    b = torch.randn(N, generator=g)
    wtype = {torch.bfloat16: 1, torch.float16: 2}[dtype]
    dot = dtype == torch.bfloat16 and lib.pagellm_has_bf16_dot() == 1
    y = torch.empty(M, N)
    lib.pagellm_linear_half(
        x.data_ptr(), K, w.data_ptr(), wtype, b.data_ptr(), y.data_ptr(), M, N, K, 2
    )
    xin = x.to(torch.bfloat16).float() if dot else x
    torch.testing.assert_close(y, xin @ w.float().T + b, rtol=1e-4, atol=1e-4)
    for m in range(M):  # each row alone: the same bits
        y1 = torch.empty(1, N)
        lib.pagellm_linear_half(
            x[m].data_ptr(), K, w.data_ptr(), wtype, b.data_ptr(), y1.data_ptr(), 1, N, K, 1
        )
        assert torch.equal(y1[0], y[m])
