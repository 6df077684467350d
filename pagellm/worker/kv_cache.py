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
            f"({format_bytes(self.kv_bytes)}); {self.max_concurrency:.1f} requests of "
            f"max_model_len={self.max_model_len} fit at once"
            + (
                ""
                if layout.windows == (None,)
                else f"; {layout.describe()}, blocks behind a window are freed"
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

    On CPU the tensors are left uninitialised, so start-up does not commit the whole
    budget (the OS hands out pages as they are first written); every backend reads only
    rows it wrote or masks them out. On CUDA they are zeroed (cheap there).
    """
    num_kv_heads = num_kv_heads or (
        getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    )
    shape = (plan.num_blocks, plan.block_size, num_kv_heads, head_dim_of(hf_config))
    alloc = torch.zeros if device.type == "cuda" else torch.empty
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
