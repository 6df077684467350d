"""The memory plan and the paged KV tensors.

One (K, V) pair per KV slot, each ``[num_blocks, block_size, num_kv_heads, head_dim]`` in
the KV cache dtype (int8 adds a float32 scale per token and KV head to each), allocated
once at start-up from a byte budget. A model whose layers all attend alike has a slot
per layer; one that mixes sliding-window and full layers has its layers in KV cache
groups sharing the slots (KVCacheLayout in config.py), so a block is a page over the slots. On
CPU the budget is ``kv_cache_memory`` (4 GiB by default); on CUDA it is what is left of
``gpu_memory_utilization`` x total memory after weights and the activation peak of a
profiling forward pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from pagellm.config import DEFAULT_CPU_KV_CACHE_MEMORY, CacheConfig, KVCacheGroup, KVCacheLayout
from pagellm.layers.attention import KV_CACHE_DTYPES, LayerKVCache
from pagellm.models.llama import head_dim_of
from pagellm.utils import format_bytes

logger = logging.getLogger(__name__)


def kv_bytes_per_token(
    hf_config: Any, kv_cache_dtype: str, num_layers: int | None = None,
    num_kv_heads: int | None = None,
) -> int:  # fmt: skip
    """K and V bytes of one token over ``num_layers`` layers (default: all of them; int8:
    codes plus a scale per head) and ``num_kv_heads`` (default: the model's)."""
    num_kv_heads = num_kv_heads or (
        getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    )
    elem = torch.empty(0, dtype=KV_CACHE_DTYPES[kv_cache_dtype]).element_size()
    per_head = head_dim_of(hf_config) * elem + (4 if kv_cache_dtype == "int8" else 0)
    layers = hf_config.num_hidden_layers if num_layers is None else num_layers
    return int(layers * 2 * num_kv_heads * per_head)


@dataclass(frozen=True)
class KVCachePlan:
    """What start-up measured and decided; never written back into a config."""

    weight_bytes: int
    kv_bytes_per_token: int
    """Bytes of one token position in a block: over every slot (plus a draft's layers)."""
    block_size: int
    num_blocks: int
    budget_bytes: int
    max_model_len: int
    layout: KVCacheLayout
    max_chunk: int = 0
    """The longest prefill chunk (the scheduler's token budget; 0: max_model_len)."""
    spec_slots: int = 0
    """Slots past a request's tokens that speculative decoding may hold (the proposals
    being verified and a draft's lookahead)."""
    num_tier_slots: int = 0
    """Blocks the second KV tier holds (kv_offload_bytes / bytes per block; 0: none)."""
    tier_dir: str | None = None
    """Where the second tier's file lives (None: host memory)."""

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_per_request(self, decoding: bool = True) -> int:
        """Blocks one request of max_model_len holds at most, every group together:
        while decoding (a sliding group holds its window, the partly slid block at its
        start and the block being filled), or at its peak (``decoding=False``: a sliding
        group also holds the longest prefill chunk past its window, and every group the
        speculative slots past the request's tokens)."""
        bs, n = self.block_size, self.max_model_len
        chunk = min(self.max_chunk or n, n)
        extra = 0 if decoding else self.spec_slots
        total = 0
        for group in self.layout.groups:
            if group.window is None:
                total += -(-(n + extra) // bs)
            else:
                span = group.window + 2 * bs if decoding else group.window + chunk + bs
                total += -(-(min(n, span) + extra) // bs)
        return total

    @property
    def max_concurrency(self) -> float:
        """Requests of max_model_len (decoding) whose KV fits at once."""
        return self.num_blocks / self.blocks_per_request()

    @property
    def kv_bytes_per_context_token(self) -> float:
        """KV bytes a full-length request holds per token of its length, every group
        together (a sliding group holds its window only): what a long decode reads."""
        held = self.blocks_per_request() * self.block_size * self.kv_bytes_per_token
        return held / self.max_model_len

    @property
    def kv_bytes(self) -> int:
        return self.num_tokens * self.kv_bytes_per_token

    def describe(self) -> str:
        layout = self.layout
        return (
            f"weights {format_bytes(self.weight_bytes)}; KV {format_bytes(self.kv_bytes_per_token)}/token; "
            f"{self.num_blocks} blocks x {self.block_size} tokens = {self.num_tokens} tokens "
            f"({format_bytes(self.kv_bytes)}, resident from start-up); "
            f"{self.max_concurrency:.1f} requests of "
            f"max_model_len={self.max_model_len} fit at once"
            + (
                ""
                if layout.windows == (None,)
                else f"; {layout.describe()}, blocks behind a window are freed"
            )
            + (
                f"; second tier {self.num_tier_slots} blocks = "
                f"{self.num_tier_slots * self.block_size} tokens "
                f"({format_bytes(self.num_tier_slots * self.block_size * self.kv_bytes_per_token)}, "
                f"{'file in ' + self.tier_dir if self.tier_dir else 'host memory'})"
                if self.num_tier_slots
                else ""
            )
        )


def plan_kv_cache(
    hf_config: Any,
    cache_config: CacheConfig,
    device: torch.device,
    max_model_len: int,
    weight_bytes: int,
    profiled_peak_bytes: int = 0,
    draft_hf_config: Any = None,
    layout: KVCacheLayout | None = None,
    max_chunk: int = 0,
    spec_slots: int = 0,
    num_kv_heads: int | None = None,
    num_local_slots: int | None = None,
) -> KVCachePlan:
    """``draft_hf_config``: a draft model (speculative decoding) keeps its own KV for
    the same blocks; its bytes per token are counted too. ``layout``: the KV cache
    groups (default: one group of every layer, full attention). A tensor- or
    pipeline-parallel worker plans its own share: ``num_kv_heads`` of its attention and
    ``num_local_slots`` of the layout's slots (those its stage's layers use)."""
    if layout is None:
        layout = KVCacheLayout(
            (KVCacheGroup(None, tuple(range(hf_config.num_hidden_layers))),),
            hf_config.num_hidden_layers,
        )
    per_token = kv_bytes_per_token(
        hf_config, cache_config.kv_cache_dtype,
        layout.num_slots if num_local_slots is None else num_local_slots, num_kv_heads,
    )  # fmt: skip
    if draft_hf_config is not None:
        per_token += kv_bytes_per_token(draft_hf_config, cache_config.kv_cache_dtype)
    per_block = per_token * cache_config.block_size
    if cache_config.kv_cache_memory is not None:
        budget = int(cache_config.kv_cache_memory)
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free - torch.cuda.memory_reserved(device)
        budget = (
            int(total * cache_config.gpu_memory_utilization) - used_by_others - profiled_peak_bytes
        )
    else:
        budget = DEFAULT_CPU_KV_CACHE_MEMORY
    num_blocks = max(budget // per_block, 0)
    if cache_config.num_gpu_blocks_override is not None:
        num_blocks = cache_config.num_gpu_blocks_override
    plan = KVCachePlan(
        weight_bytes=weight_bytes,
        kv_bytes_per_token=per_token,
        block_size=cache_config.block_size,
        num_blocks=int(num_blocks),
        budget_bytes=budget,
        max_model_len=max_model_len,
        layout=layout,
        max_chunk=max_chunk,
        spec_slots=spec_slots,
        num_tier_slots=int(cache_config.kv_offload_bytes // per_block),
        tier_dir=cache_config.kv_offload_dir,
    )
    if cache_config.kv_offload_bytes and not plan.num_tier_slots:
        raise ValueError(
            f"the second KV tier of {format_bytes(cache_config.kv_offload_bytes)} holds no "
            f"block of {format_bytes(per_block)}: raise kv_offload_size (or swap_space)"
        )
    if plan.num_blocks < plan.blocks_per_request(decoding=False):
        need = plan.blocks_per_request(decoding=False) * per_block
        raise ValueError(
            f"the KV cache cannot hold one request of max_model_len={max_model_len} tokens: "
            f"the budget of {format_bytes(budget)} gives {plan.num_blocks} blocks = "
            f"{plan.num_tokens} tokens at {format_bytes(per_token)} per token, and one full-length "
            f"request needs {format_bytes(need)}. Raise kv_cache_memory (or "
            f"gpu_memory_utilization) or lower max_model_len."
        )
    logger.info("KV cache plan: %s", plan.describe())
    return plan


def allocate_kv_cache(
    plan: KVCachePlan,
    hf_config: Any,
    kv_cache_dtype: str,
    device: torch.device,
    num_slots: int | None = None,
    num_kv_heads: int | None = None,
    used_slots: set[int] | None = None,
) -> list[LayerKVCache]:
    """One LayerKVCache per KV slot (per layer when all layers attend alike);
    ``num_slots`` overrides the plan's (a draft model: one per draft layer). A parallel
    worker allocates ``num_kv_heads`` (its TP share) and only its stage's ``used_slots``
    (the others get empty tensors).

    The tensors are zeroed on every device, so the whole budget is resident from
    start-up and a long run's memory stays flat (left uninitialised on CPU, the pool grew
    page by page as blocks were first written: a 30-minute soak grew to 4.9 GB).
    """
    num_kv_heads = num_kv_heads or (
        getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    )
    shape = (plan.num_blocks, plan.block_size, num_kv_heads, head_dim_of(hf_config))
    alloc = torch.zeros
    dtype = KV_CACHE_DTYPES[kv_cache_dtype]
    caches = []
    for slot in range(plan.layout.num_slots if num_slots is None else num_slots):
        if used_slots is not None and slot not in used_slots:
            caches.append(LayerKVCache(torch.empty(0), torch.empty(0)))
            continue
        scales: list[torch.Tensor | None] = [None, None]
        if kv_cache_dtype == "int8":
            scales = [alloc(shape[:3], dtype=torch.float32, device=device) for _ in range(2)]
        caches.append(
            LayerKVCache(
                alloc(shape, dtype=dtype, device=device),
                alloc(shape, dtype=dtype, device=device),
                scales[0],
                scales[1],
                kv_cache_dtype,
            )
        )
    return caches


_TIER_MAGIC = b"PGKV"
_TIER_FILE_HEADER = 4096  # bytes: magic, then the JSON description the file was made for
_TIER_SLOT_HEADER = 64  # bytes per slot: magic, crc32 of the slot's data, block hash


class KVTierStore:
    """The second KV tier's tensors (the bookkeeping is core/kv_tier.py's): one row of
    bytes per slot holding every local layer's K and V of one block (and int8 scales),
    so a slot is one contiguous copy.

        row:  [64-byte header | layer 0 K | layer 0 V | layer 1 K | ... ]
        header: b"PGKV" | crc32(rest of the row) | 32-byte block hash | zeros

    In host memory, or in a file (``directory``) that survives a restart: the file starts
    with a JSON description (model, dtypes, shapes); a file made for anything else is
    replaced, a file of the wrong length (torn) is replaced, and a slot whose crc does
    not match its data is never loaded. Headers are written after the data, so a crash
    mid-copy leaves a slot that fails its crc. Each data-parallel replica or tensor-parallel
    rank takes its own file (an exclusive lock picks a free one).
    """

    def __init__(
        self,
        caches: list[LayerKVCache],
        num_slots: int,
        directory: str | None = None,
        description: dict[str, Any] | None = None,
    ) -> None:
        import numpy as np

        self.parts: list[tuple[torch.Tensor, int, int]] = []  # (cache bytes, offset, size)
        self.row_bytes = 0
        self.bind(caches)
        offset = self.row_bytes
        self.num_slots = num_slots
        self.path: str | None = None
        self._file: Any = None
        self._mmap: Any = None
        if directory is None:
            self.rows = torch.zeros(num_slots, offset, dtype=torch.uint8)  # resident now
            return
        import fcntl
        import json
        import os

        os.makedirs(directory, exist_ok=True)
        meta = json.dumps(
            {**(description or {}), "row_bytes": offset, "num_slots": num_slots,
             "parts": [list(t.shape[1:]) for t, _, _ in self.parts]},
            sort_keys=True,
        ).encode()  # fmt: skip
        if len(meta) + 8 > _TIER_FILE_HEADER:
            raise ValueError("the KV tier's description does not fit its file header")
        header = _TIER_MAGIC + len(meta).to_bytes(4, "little") + meta
        size = _TIER_FILE_HEADER + num_slots * offset
        rank = (description or {}).get("rank", 0)
        for k in range(64):
            path = os.path.join(directory, f"kv-tier-rank{rank}-{k}.bin")
            # Read-write, created if missing (not "a+": appends ignore seek).
            f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            break
        else:
            raise ValueError(f"every KV tier file in {directory} is in use")
        self.path, self._file = path, f
        f.seek(0)
        current = f.read(_TIER_FILE_HEADER)
        existing = os.path.getsize(path)
        if current[: len(header)] != header or existing != size:
            if existing:
                logger.warning(
                    "KV tier file %s was made for another model or layout, or is torn "
                    "(%d bytes, expected %d): starting it afresh", path, existing, size,
                )  # fmt: skip
            f.truncate(0)
            f.truncate(size)
            f.seek(0)
            f.write(header)
            f.flush()
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r+", offset=_TIER_FILE_HEADER,
                               shape=(num_slots, offset))  # fmt: skip
        self.rows = torch.from_numpy(self._mmap)

    def bind(self, caches: list[LayerKVCache]) -> None:
        """Point at the main pool's tensors (again, after they were re-allocated: sleep
        mode); the slots keep their contents."""
        parts = []
        offset = _TIER_SLOT_HEADER
        for cache in caches:
            for t in cache.tensors():
                if t.numel() == 0:
                    continue
                raw = t.view(torch.uint8)  # bytes: any KV dtype (fp8 too) copies alike
                size = raw[0].numel()
                parts.append((raw, offset, size))
                offset += size
        if self.row_bytes and offset != self.row_bytes:
            raise ValueError("the KV cache was re-allocated with another layout")
        self.parts, self.row_bytes = parts, offset

    def save(self, ops: list[tuple[int, int, bytes]]) -> None:
        """Copy main-pool blocks into slots: (block id, slot, block hash), in order."""
        last: dict[int, tuple[int, bytes]] = {}
        for block, slot, block_hash in ops:  # two offloads to one slot: the later wins
            last[slot] = (block, block_hash)
        slots = torch.tensor(list(last), dtype=torch.long)
        blocks = torch.tensor([b for b, _ in last.values()], dtype=torch.long)
        n = len(last)
        for t, off, size in self.parts:
            self.rows[slots, off : off + size] = t[blocks].reshape(n, -1)
        if self._mmap is not None:
            import zlib

            rows = self._mmap
            for slot, (_, block_hash) in last.items():
                crc = zlib.crc32(rows[slot, _TIER_SLOT_HEADER:])
                head = _TIER_MAGIC + crc.to_bytes(4, "little") + block_hash
                rows[slot, : len(head)] = list(head)

    def load(self, ops: list[tuple[int, int]]) -> None:
        """Copy slots back into main-pool blocks: (slot, block id)."""
        slots = torch.tensor([s for s, _ in ops], dtype=torch.long)
        blocks = torch.tensor([b for _, b in ops], dtype=torch.long)
        n = len(ops)
        for t, off, size in self.parts:
            t[blocks] = self.rows[slots, off : off + size].reshape(n, *t.shape[1:])

    def entries(self) -> list[tuple[int, bytes]]:
        """(slot, block hash) of every intact slot of a file tier (none in memory)."""
        if self._mmap is None:
            return []
        import zlib

        out, torn = [], 0
        rows = self._mmap
        for slot in range(self.num_slots):
            head = bytes(rows[slot, :40])
            if head[:4] != _TIER_MAGIC:
                continue
            if zlib.crc32(rows[slot, _TIER_SLOT_HEADER:]) != int.from_bytes(head[4:8], "little"):
                torn += 1
                rows[slot, :4] = 0  # never offered again
                continue
            out.append((slot, head[8:40]))
        if torn:
            logger.warning("KV tier file %s: %d damaged blocks dropped", self.path, torn)
        return out

    def close(self) -> None:
        if self._mmap is not None:
            self._mmap.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
