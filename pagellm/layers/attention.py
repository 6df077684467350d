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
"""

from __future__ import annotations

import abc
import ctypes
from collections.abc import Iterator
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


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata


_FORWARD_CONTEXT: ContextVar[ForwardContext | None] = ContextVar("pagellm_forward", default=None)


@contextmanager
def set_forward_context(attn_metadata: AttentionMetadata) -> Iterator[None]:
    """The per-step state every attention layer reads; set only around a forward pass."""
    token = _FORWARD_CONTEXT.set(ForwardContext(attn_metadata))
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
    ) -> bool: ...

    def prepare(self, meta: AttentionMetadata) -> Any:
        """Per-step work shared by all layers (index tensors, masks)."""
        return None

    @abc.abstractmethod
    def forward(
        self,
        meta: AttentionMetadata,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
    ) -> torch.Tensor:
        """q[T, Hq*D], k/v[T, Hkv*D] (rows may be strided) -> out[T, Hq*D]."""


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
) -> AttentionBackend:
    """Instantiate a backend by name; 'auto' picks the fastest one that supports the device."""
    if name == "auto":
        for candidate in ("cpu_native", "torch"):
            cls = ATTENTION_BACKENDS[candidate]
            if cls.supports(device, dtype, head_dim, native_lib):
                return cls(native_lib)
        raise ValueError(f"no attention backend supports {device} / {dtype}")
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(sorted(ATTENTION_BACKENDS))}"
        )
    cls = ATTENTION_BACKENDS[name]
    if not cls.supports(device, dtype, head_dim, native_lib):
        raise ValueError(
            f"attention backend {name!r} does not support {device} / {dtype} / head_dim={head_dim}"
            + ("" if native_lib is not None else " without the native CPU kernels")
        )
    return cls(native_lib)


@dataclass
class _TorchStepData:
    decode_rows: torch.Tensor | None  # batch rows of single-token sequences
    decode_tables: torch.Tensor | None  # [Bd, nblk] their block tables, trimmed
    decode_pad: torch.Tensor | None  # [Bd, nblk * bs] True past each sequence's end
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
    ) -> bool:
        return True

    def prepare(self, meta: AttentionMetadata) -> _TorchStepData:
        qsl = meta.query_start_loc_cpu
        seq_lens = meta.seq_lens_cpu
        q_lens = qsl[1:] - qsl[:-1]
        dev = meta.block_tables.device
        bs = meta.block_size
        dec = np.nonzero(q_lens == 1)[0]
        decode_rows = decode_tables = decode_pad = None
        if len(dec):
            max_len = int(seq_lens[dec].max())
            nblk = -(-max_len // bs)
            idx = torch.as_tensor(dec, device=dev)
            decode_rows = torch.as_tensor(qsl[dec], device=dev, dtype=torch.long)
            decode_tables = meta.block_tables[idx, :nblk].long()
            pos = torch.arange(nblk * bs, device=dev)
            lens = torch.as_tensor(seq_lens[dec], device=dev)
            decode_pad = pos[None, :] >= lens[:, None]
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
        return _TorchStepData(decode_rows, decode_tables, decode_pad, prefills)

    def forward(
        self,
        meta: AttentionMetadata,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
    ) -> torch.Tensor:
        T = q.shape[0]
        Hq, Hkv, D = num_heads, num_kv_heads, head_dim
        G = Hq // Hkv
        k_rows = k_cache.view(-1, Hkv, D)
        v_rows = v_cache.view(-1, Hkv, D)
        k_rows.index_copy_(0, meta.slot_mapping, k.reshape(T, Hkv, D))
        v_rows.index_copy_(0, meta.slot_mapping, v.reshape(T, Hkv, D))
        q = q.reshape(T, Hq, D)
        out = torch.empty_like(q)
        data: _TorchStepData = meta.backend_data
        bs = meta.block_size
        if data.decode_rows is not None:
            assert data.decode_tables is not None and data.decode_pad is not None
            Bd, nblk = data.decode_tables.shape
            pad = data.decode_pad
            qd = q.index_select(0, data.decode_rows).view(Bd, Hkv, G, D)
            kd = k_cache[data.decode_tables].view(Bd, nblk * bs, Hkv, D).transpose(1, 2)
            # Rows past a sequence's end hold whatever the block held before: zero them
            # so that even non-finite leftovers cannot leak through a zero probability.
            vd = v_cache[data.decode_tables].view(Bd, nblk * bs, Hkv, D)
            vd = vd.masked_fill_(pad[:, :, None, None], 0).transpose(1, 2)
            scores = torch.matmul(qd, kd.transpose(-1, -2)) * scale
            scores.masked_fill_(pad[:, None, None, :], float("-inf"))
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out.index_copy_(0, data.decode_rows, torch.matmul(probs, vd).reshape(Bd, Hq, D))
        for start, end, seq_len, blocks, mask in data.prefills:
            kp = k_cache[blocks].view(-1, Hkv, D)[:seq_len].transpose(0, 1)
            vp = v_cache[blocks].view(-1, Hkv, D)[:seq_len].transpose(0, 1)
            qp = q[start:end].transpose(0, 1)
            if G > 1:
                kp = kp.repeat_interleave(G, dim=0)
                vp = vp.repeat_interleave(G, dim=0)
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale)
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
    ) -> bool:
        # The kernel works on 32-channel slices of each head.
        return (
            device.type == "cpu"
            and dtype == torch.float32
            and head_dim % 32 == 0
            and native_lib is not None
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
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
    ) -> torch.Tensor:
        T = q.shape[0]
        data: _NativeStepData = meta.backend_data
        lib = self._lib
        assert q.stride(1) == 1 and k.stride(1) == 1 and v.stride(1) == 1
        lib.pagellm_write_kv_f32(
            k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(),
            v_cache.data_ptr(), meta.slot_mapping.data_ptr(), T, num_kv_heads * head_dim,
        )  # fmt: skip
        out = torch.empty((T, num_heads * head_dim), dtype=q.dtype)
        lib.pagellm_paged_attention_f32(
            q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
            data.block_tables.data_ptr(), data.block_tables.shape[1], data.seq_lens.data_ptr(),
            data.query_start_loc.data_ptr(), data.token_to_seq.data_ptr(), out.data_ptr(),
            T, num_heads, num_kv_heads, head_dim, meta.block_size, meta.max_seq_len, scale,
            ops.num_threads(),
        )  # fmt: skip
        return out


class Attention(nn.Module):
    """Attention of one layer over its own slice of the paged KV cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # Bound by the worker once the KV cache is allocated (not parameters or buffers).
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = get_forward_context().attn_metadata
        assert meta.backend is not None
        return meta.backend.forward(
            meta, q, k, v, self.k_cache, self.v_cache,
            self.num_heads, self.num_kv_heads, self.head_dim, self.scale,
        )  # fmt: skip
