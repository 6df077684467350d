"""Paged attention: the layer, the per-step metadata and the backend registry.

One step is a flat batch of T tokens from B sequences with no padding. Sequence s owns
query rows ``query_start_loc[s] : query_start_loc[s+1]`` and, counting the tokens
computed in earlier steps, has ``seq_lens[s]`` tokens of context; its last query row
sits at position ``seq_lens[s] - 1``. Its KV lives in the blocks listed in
``block_tables[s]``; token position p is in row ``p % block_size`` of block
``block_tables[s][p // block_size]``, and ``slot_mapping[t]`` is that flat row index
for the token computed at batch row t.

    tokens     | A A A A | B | C C |        (A: prefill chunk of 4, B: decode, C: chunk)
    q_start    0         4   5     7
    seq_lens   [ 4,        9,  2  ]

Every backend first writes the step's K/V into the cache, then attends through the
block tables, so all layers see the same cache whatever mix of prefill and decode
(or prefix-cache hits) the step holds.

Each attention layer declares its kind in an ``AttentionSpec`` fixed at construction:
full, a sliding window of W positions (a token sees itself and the W - 1 before it), and
optionally a logit soft-cap (scores become cap * tanh(score / cap)). When the worker binds
a layer's KV cache it builds the backend for that layer's constants (``Attention.bind`` ->
``LayerAttention``); backends never read keys wholly outside a window, whose blocks the
scheduler may already have freed.

The cache may be stored in a narrower type than the run dtype (``--kv-cache-dtype``):
bfloat16 / float16, fp8 e4m3 (values saturated at +-448, no scale, as vLLM's default),
or int8 codes with a float scale per (token, KV head). Backends read it in place.
"""

from __future__ import annotations

import abc
import ctypes
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pagellm.layers import ops


@dataclass
class AttentionMetadata:
    num_tokens: int
    num_seqs: int
    block_size: int
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: np.ndarray
    seq_lens_cpu: np.ndarray
    backend: AttentionBackend | None = None
    backend_data: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AttentionSpec:
    """What kind of attention a layer computes (its constants, fixed at construction)."""

    sliding_window: int | None = None
    """Positions a token attends to, itself included; None: all before it."""
    logit_softcap: float | None = None
    """Scores become cap * tanh(score / cap) before the softmax; None: unchanged."""

    @property
    def is_full(self) -> bool:
        return self.sliding_window is None


FULL_ATTENTION = AttentionSpec()

KV_CACHE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "int8": torch.int8,
}
# The element type codes of pagellm/csrc/cpu_ops.c (float16 has no native path).
_NATIVE_KV_TYPES = {"float32": 0, "bfloat16": 1, "fp8_e4m3": 2, "int8": 3}
FP8_MAX = 448.0


@dataclass
class LayerKVCache:
    """One layer's paged K and V: [num_blocks, block_size, num_kv_heads, head_dim] each,
    plus a float scale per (block, row, KV head) for int8."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    dtype: str = "float32"

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rows k/v [T, Hkv, D] (any float dtype) at the flat slots (torch ops)."""
        for x, cache, scale in ((k, self.k, self.k_scale), (v, self.v, self.v_scale)):
            rows = cache.view(-1, *cache.shape[2:])
            if self.dtype == "int8":
                assert scale is not None
                amax = x.float().abs().amax(dim=-1)
                s = amax / 127
                codes = torch.round(x.float() * torch.where(amax > 0, 127 / amax, 0)[..., None])
                rows.index_copy_(0, slots, codes.to(torch.int8))
                scale.view(-1, scale.shape[2]).index_copy_(0, slots, s)
            elif self.dtype == "fp8_e4m3":
                # torch's CPU index ops do not take float8: move the bytes as uint8.
                val = x.float().clamp(-FP8_MAX, FP8_MAX).to(cache.dtype)
                rows.view(torch.uint8).index_copy_(0, slots, val.view(torch.uint8))
            else:
                rows.index_copy_(0, slots, x.to(cache.dtype))

    def read(self, blocks: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the given blocks ([..., block_size, Hkv, D]) in ``dtype``."""
        if self.dtype == "fp8_e4m3":
            k = self.k.view(torch.uint8)[blocks].view(self.k.dtype).to(dtype)
            v = self.v.view(torch.uint8)[blocks].view(self.v.dtype).to(dtype)
        else:
            k, v = self.k[blocks].to(dtype), self.v[blocks].to(dtype)
        if self.dtype == "int8":
            assert self.k_scale is not None and self.v_scale is not None
            k = k * self.k_scale[blocks].to(dtype)[..., None]
            v = v * self.v_scale[blocks].to(dtype)[..., None]
        return k, v


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata
    """KV cache group 0's (the step's shape: tokens, sequences, lengths)."""
    group_metadata: Sequence[AttentionMetadata]
    """One per KV cache group: the same step through that group's block tables."""


_FORWARD_CONTEXT: ContextVar[ForwardContext | None] = ContextVar("pagellm_forward", default=None)


@contextmanager
def set_forward_context(
    attn_metadata: AttentionMetadata | Sequence[AttentionMetadata],
) -> Iterator[None]:
    """The per-step state every attention layer reads; set only around a forward pass.
    A list gives one metadata per KV cache group (KVCacheLayout in config.py)."""
    metas = [attn_metadata] if isinstance(attn_metadata, AttentionMetadata) else attn_metadata
    token = _FORWARD_CONTEXT.set(ForwardContext(metas[0], metas))
    try:
        yield
    finally:
        _FORWARD_CONTEXT.reset(token)


def get_forward_context() -> ForwardContext:
    ctx = _FORWARD_CONTEXT.get()
    if ctx is None:
        raise RuntimeError("the model was called outside set_forward_context()")
    return ctx


class AttentionBackend(abc.ABC):
    """Computes attention for a flat batch against the paged KV cache.

    ``native_lib`` is the compiled CPU kernel library the model runner chose (None:
    none); backends that do not use it ignore it.
    """

    name: ClassVar[str]

    def __init__(self, native_lib: ctypes.CDLL | None = None) -> None:
        self.native_lib = native_lib

    @classmethod
    @abc.abstractmethod
    def supports(
        cls,
        device: torch.device,
        dtype: torch.dtype,
        head_dim: int,
        native_lib: ctypes.CDLL | None,
        kv_cache_dtype: str = "float32",
    ) -> bool: ...

    def prepare(self, meta: AttentionMetadata) -> Any:
        """Per-step work shared by all layers (index tensors, masks)."""
        return None

    def for_layer(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, spec: AttentionSpec
    ) -> LayerAttention:
        """This backend bound to one layer's constants (built once, when the worker binds
        the layer's KV cache)."""
        return LayerAttention(self, num_heads, num_kv_heads, head_dim, scale, spec)

    @abc.abstractmethod
    def forward(
        self,
        meta: AttentionMetadata,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: LayerKVCache,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        spec: AttentionSpec = FULL_ATTENTION,
    ) -> torch.Tensor:
        """q[T, Hq*D], k/v[T, Hkv*D] (rows may be strided) -> out[T, Hq*D], as the layer's
        spec says (window, soft-cap)."""


@dataclass(frozen=True)
class LayerAttention:
    """A backend with one layer's constants: heads, head size, scale and its spec."""

    backend: AttentionBackend
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    spec: AttentionSpec

    def __call__(
        self,
        meta: AttentionMetadata,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: LayerKVCache,
    ) -> torch.Tensor:
        return self.backend.forward(
            meta, q, k, v, cache, self.num_heads, self.num_kv_heads, self.head_dim, self.scale,
            self.spec,
        )  # fmt: skip


ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {}


def register_attention_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    ATTENTION_BACKENDS[cls.name] = cls
    return cls


def get_attention_backend(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    native_lib: ctypes.CDLL | None = None,
    kv_cache_dtype: str = "float32",
) -> AttentionBackend:
    """Instantiate a backend by name; 'auto' picks the fastest one that supports the device."""
    if name == "auto":
        for candidate in ("cpu_native", "torch"):
            cls = ATTENTION_BACKENDS[candidate]
            if cls.supports(device, dtype, head_dim, native_lib, kv_cache_dtype):
                return cls(native_lib)
        raise ValueError(f"no attention backend supports {device} / {dtype}")
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(sorted(ATTENTION_BACKENDS))}"
        )
    cls = ATTENTION_BACKENDS[name]
    if not cls.supports(device, dtype, head_dim, native_lib, kv_cache_dtype):
        raise ValueError(
            f"attention backend {name!r} does not support {device} / {dtype} / head_dim={head_dim}"
            f" / kv_cache_dtype={kv_cache_dtype}"
            + ("" if native_lib is not None else " without the native CPU kernels")
        )
    return cls(native_lib)


@dataclass
class _TorchStepData:
    decode_rows: torch.Tensor | None  # batch rows of single-token sequences
    decode_tables: torch.Tensor | None  # [Bd, nblk] their block tables, trimmed
    decode_pad: torch.Tensor | None  # [Bd, nblk * bs] True past each sequence's end
    decode_lens: torch.Tensor | None  # [Bd] their lengths
    prefills: list[tuple[int, int, int, torch.Tensor, torch.Tensor]]
    # (row start, row end, seq_len, block ids, bool mask [q_len, seq_len])


@register_attention_backend
class TorchAttentionBackend(AttentionBackend):
    """Portable torch implementation (CPU and CUDA), exact against a plain reference.

    Decode tokens of all sequences are batched into one gathered, masked attention;
    each prefill chunk runs scaled_dot_product_attention over its gathered context.
    """

    name = "torch"

    @classmethod
    def supports(
        cls,
        device: torch.device,
        dtype: torch.dtype,
        head_dim: int,
        native_lib: ctypes.CDLL | None,
        kv_cache_dtype: str = "float32",
    ) -> bool:
        return True

    def prepare(self, meta: AttentionMetadata) -> _TorchStepData:
        qsl = meta.query_start_loc_cpu
        seq_lens = meta.seq_lens_cpu
        q_lens = qsl[1:] - qsl[:-1]
        dev = meta.block_tables.device
        bs = meta.block_size
        dec = np.nonzero(q_lens == 1)[0]
        decode_rows = decode_tables = decode_pad = decode_lens = None
        if len(dec):
            max_len = int(seq_lens[dec].max())
            nblk = -(-max_len // bs)
            idx = torch.as_tensor(dec, device=dev)
            decode_rows = torch.as_tensor(qsl[dec], device=dev, dtype=torch.long)
            decode_tables = meta.block_tables[idx, :nblk].long()
            pos = torch.arange(nblk * bs, device=dev)
            lens = torch.as_tensor(seq_lens[dec], device=dev)
            decode_pad = pos[None, :] >= lens[:, None]
            decode_lens = lens
        prefills = []
        for s in np.nonzero(q_lens > 1)[0]:
            start, end, seq_len = int(qsl[s]), int(qsl[s + 1]), int(seq_lens[s])
            q_len = end - start
            nblk = -(-seq_len // bs)
            blocks = meta.block_tables[s, :nblk].long()
            ctx = seq_len - q_len
            rows = torch.arange(q_len, device=dev)[:, None] + ctx
            mask = torch.arange(seq_len, device=dev)[None, :] <= rows
            prefills.append((start, end, seq_len, blocks, mask))
        return _TorchStepData(decode_rows, decode_tables, decode_pad, decode_lens, prefills)

    def forward(
        self,
        meta: AttentionMetadata,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: LayerKVCache,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        spec: AttentionSpec = FULL_ATTENTION,
    ) -> torch.Tensor:
        T = q.shape[0]
        Hq, Hkv, D = num_heads, num_kv_heads, head_dim
        window, cap = spec.sliding_window, spec.logit_softcap
        G = Hq // Hkv
        cache.write(meta.slot_mapping, k.reshape(T, Hkv, D), v.reshape(T, Hkv, D))
        q = q.reshape(T, Hq, D)
        out = torch.empty_like(q)
        data: _TorchStepData = meta.backend_data
        bs = meta.block_size
        if data.decode_rows is not None:
            assert data.decode_tables is not None and data.decode_pad is not None
            Bd, nblk = data.decode_tables.shape
            pad = data.decode_pad
            if window is not None:
                # Keys before the window are masked, and zeroed: their blocks may be freed.
                assert data.decode_lens is not None
                pos = torch.arange(nblk * bs, device=pad.device)
                pad = pad | (pos[None, :] < (data.decode_lens - window)[:, None])
            qd = q.index_select(0, data.decode_rows).view(Bd, Hkv, G, D)
            kd, vd = cache.read(data.decode_tables, q.dtype)
            # Rows past a sequence's end hold whatever the block held before: zero them
            # so that even non-finite leftovers cannot leak through a zero probability.
            kd = kd.view(Bd, nblk * bs, Hkv, D).masked_fill_(pad[:, :, None, None], 0)
            kd = kd.transpose(1, 2)
            vd = vd.view(Bd, nblk * bs, Hkv, D).masked_fill_(pad[:, :, None, None], 0)
            vd = vd.transpose(1, 2)
            scores = torch.matmul(qd, kd.transpose(-1, -2)) * scale
            if cap is not None:
                scores = torch.tanh(scores / cap) * cap
            scores.masked_fill_(pad[:, None, None, :], float("-inf"))
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out.index_copy_(0, data.decode_rows, torch.matmul(probs, vd).reshape(Bd, Hq, D))
        for start, end, seq_len, blocks, mask in data.prefills:
            kb, vb = cache.read(blocks, q.dtype)
            kp = kb.view(-1, Hkv, D)[:seq_len]
            vp = vb.view(-1, Hkv, D)[:seq_len]
            if window is not None:
                rows = (
                    torch.arange(end - start, device=mask.device)[:, None] + seq_len - (end - start)
                )
                keys = torch.arange(seq_len, device=mask.device)[None, :]
                mask = mask & (keys > rows - window)
                # Keys no query of the chunk sees may sit in freed blocks: zero them.
                unseen = (keys[0] <= seq_len - (end - start) - window)[:, None, None]
                kp, vp = kp.masked_fill(unseen, 0), vp.masked_fill(unseen, 0)
            kp, vp = kp.transpose(0, 1), vp.transpose(0, 1)
            qp = q[start:end].transpose(0, 1)
            if G > 1:
                kp = kp.repeat_interleave(G, dim=0)
                vp = vp.repeat_interleave(G, dim=0)
            if cap is None:
                o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale)
            else:
                s = torch.tanh(torch.matmul(qp, kp.transpose(-1, -2)) * scale / cap) * cap
                s = s.masked_fill(~mask, float("-inf"))
                o = torch.matmul(torch.softmax(s.float(), dim=-1).to(qp.dtype), vp)
            out[start:end] = o.transpose(0, 1)
        return out.view(T, Hq * D)


@dataclass
class _NativeStepData:
    token_to_seq: torch.Tensor  # [T] int32
    block_tables: torch.Tensor  # contiguous int32
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor


@register_attention_backend
class CpuNativeAttentionBackend(AttentionBackend):
    """pagellm's fused C kernel: reads K/V straight from the blocks, no gather copies."""

    name = "cpu_native"

    def __init__(self, native_lib: ctypes.CDLL | None = None) -> None:
        if native_lib is None:
            raise ValueError("the cpu_native attention backend needs the compiled CPU kernels")
        super().__init__(native_lib)
        self._lib: ctypes.CDLL = native_lib

    @classmethod
    def supports(
        cls,
        device: torch.device,
        dtype: torch.dtype,
        head_dim: int,
        native_lib: ctypes.CDLL | None,
        kv_cache_dtype: str = "float32",
    ) -> bool:
        # The kernel works on 32-channel slices of each head.
        return (
            device.type == "cpu"
            and dtype == torch.float32
            and head_dim % 32 == 0
            and native_lib is not None
            and kv_cache_dtype in _NATIVE_KV_TYPES
        )

    def prepare(self, meta: AttentionMetadata) -> _NativeStepData:
        q_lens = np.diff(meta.query_start_loc_cpu)
        token_to_seq = np.repeat(np.arange(meta.num_seqs, dtype=np.int32), q_lens)
        return _NativeStepData(
            token_to_seq=torch.from_numpy(token_to_seq),
            block_tables=meta.block_tables.to(torch.int32).contiguous(),
            seq_lens=meta.seq_lens.to(torch.int32).contiguous(),
            query_start_loc=meta.query_start_loc.to(torch.int32).contiguous(),
        )

    def forward(
        self,
        meta: AttentionMetadata,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: LayerKVCache,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        spec: AttentionSpec = FULL_ATTENTION,
    ) -> torch.Tensor:
        T = q.shape[0]
        data: _NativeStepData = meta.backend_data
        lib = self._lib
        assert q.stride(1) == 1 and k.stride(1) == 1 and v.stride(1) == 1
        kvt = _NATIVE_KV_TYPES[cache.dtype]
        ks = None if cache.k_scale is None else cache.k_scale.data_ptr()
        vs = None if cache.v_scale is None else cache.v_scale.data_ptr()
        lib.pagellm_write_kv(
            k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), cache.k.data_ptr(),
            cache.v.data_ptr(), ks, vs, meta.slot_mapping.data_ptr(), T, num_kv_heads, head_dim,
            kvt,
        )  # fmt: skip
        out = torch.empty((T, num_heads * head_dim), dtype=q.dtype)
        lib.pagellm_paged_attention(
            q.data_ptr(), q.stride(0), cache.k.data_ptr(), cache.v.data_ptr(), ks, vs,
            data.block_tables.data_ptr(), data.block_tables.shape[1], data.seq_lens.data_ptr(),
            data.query_start_loc.data_ptr(), data.token_to_seq.data_ptr(), out.data_ptr(),
            T, num_heads, num_kv_heads, head_dim, meta.block_size, meta.max_seq_len, scale, kvt,
            spec.sliding_window or 0, spec.logit_softcap or 0.0, ops.num_threads(),
        )  # fmt: skip
        return out


class Attention(nn.Module):
    """Attention of one layer over its own slice of the paged KV cache."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        spec: AttentionSpec = FULL_ATTENTION,
    ) -> None:
        super().__init__()
        if spec.sliding_window is not None and spec.sliding_window < 1:
            raise ValueError(f"sliding window must be positive, got {spec.sliding_window}")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.spec = spec
        # Bound by the worker once the KV cache is allocated (not parameters or buffers).
        self.kv_cache = LayerKVCache(torch.empty(0), torch.empty(0))
        self.impl: LayerAttention | None = None
        self.kv_group = 0
        """The KV cache group whose block tables address this layer's cache."""

    def bind(self, cache: LayerKVCache, backend: AttentionBackend, group: int = 0) -> None:
        """Give the layer its KV cache (its group's slot), the group whose block tables
        address it, and the backend built for its constants."""
        self.kv_cache = cache
        self.kv_group = group
        self.impl = backend.for_layer(
            self.num_heads, self.num_kv_heads, self.head_dim, self.scale, self.spec
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = get_forward_context().group_metadata[self.kv_group]
        impl = self.impl
        if impl is None or impl.backend is not meta.backend:
            # Not bound by a worker (tests driving a model directly): bind to the step's.
            assert meta.backend is not None
            self.bind(self.kv_cache, meta.backend, self.kv_group)
            impl = self.impl
            assert impl is not None
        return impl(meta, q, k, v, self.kv_cache)
