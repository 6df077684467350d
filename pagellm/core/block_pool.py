"""BlockPool: the KV blocks as bookkeeping (no tensors).

Every block is in exactly one of three states:

    state    ref_cnt   in free list   block_hash
    -------  --------  -------------  ----------
    in use   >= 1      no             any
    cached   0         yes            set   (contents still valid, reusable on a hit)
    free     0         yes            None

so ``free + cached + in use == total`` always holds (``check()`` verifies it).

The free list is ordered for eviction (least recently used first). Freed blocks go to
its tail; a request frees its blocks last-to-first so a prompt's tail is evicted before
its head, keeping shared prefixes alive longest. Allocation pops from the head and, if
the block was cached, drops its hash (eviction).

With ``record_events`` the pool also logs every hash it starts or stops serving (vLLM's
KV events: BlockStored / BlockRemoved), which the engine ships with each step so that a
data-parallel router knows exactly which prefixes each replica holds.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

BlockHash = bytes


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_key: object = None
) -> BlockHash:
    """Chained hash of a full block: (parent hash, its token ids, extra key).

    sha256 so that two different prefixes never share a block by accident; the extra key
    separates caches that must not mix (a LoRA adapter, a per-request cache salt).
    """
    h = hashlib.sha256()
    h.update(parent_hash or b"root")
    h.update(b"|")
    h.update(",".join(map(str, token_ids)).encode())
    if extra_key is not None:
        h.update(b"|")
        h.update(repr(extra_key).encode())
    return h.digest()


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    offload: bool = True
    """Whether evicting it copies it to the second KV tier (if there is one); off for the
    blocks of a request preempted in recompute mode."""

    def __repr__(self) -> str:
        tag = self.block_hash.hex()[:8] if self.block_hash else "-"
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, hash={tag})"


class BlockPool:
    def __init__(
        self, num_blocks: int, enable_caching: bool = True, record_events: bool = False
    ) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Eviction order: head is evicted first. Holds every block with ref_cnt == 0.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, KVBlock] = {}
        self.num_cache_evictions = 0
        # Hashes cached and dropped since the last take_events() (None: not recorded).
        self._stored: list[BlockHash] | None = [] if record_events else None
        self._removed: list[BlockHash] = []
        # Called with a cached block about to be reused, before its hash is dropped (the
        # KV manager copies it to the second tier from there).
        self.on_evict: Callable[[KVBlock, BlockHash], None] | None = None

    # ---- queries -------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that an allocation may take (free or cached-but-unreferenced)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Share of blocks referenced by running requests."""
        return 1.0 - len(self._free) / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self._cached.get(block_hash)

    # ---- allocate / free -----------------------------------------------------------

    def allocate(self, n: int) -> list[KVBlock]:
        """Take n blocks (ref_cnt 1 each), evicting least recently used cached ones."""
        if n > len(self._free):
            raise ValueError(f"cannot allocate {n} blocks, only {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            block.offload = True
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Add a reference to blocks found in the cache (or shared by a fork)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; unreferenced ones join the free list tail.

        Pass blocks in the order they should be evicted (callers reverse a request's
        blocks so its last block goes first).
        """
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    # ---- the cache -----------------------------------------------------------------

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Register a full, computed block under its hash (first writer wins)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return  # an identical block is already cached; this one stays private
        block.block_hash = block_hash
        self._cached[block_hash] = block
        if self._stored is not None:
            self._stored.append(block_hash)

    def uncache_block(self, block: KVBlock) -> None:
        """Forget a block's hash (its contents are about to change)."""
        self._drop_hash(block)

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            self.num_cache_evictions += 1
            if self.on_evict is not None and block.offload:
                self.on_evict(block, block.block_hash)
            self._drop_hash(block)

    def _drop_hash(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
                if self._stored is not None:
                    self._removed.append(block.block_hash)
            block.block_hash = None

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; refused (False) while any block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        if self._stored is not None:
            self._removed.extend(self._cached)
        self._cached.clear()
        return True

    def take_events(self) -> tuple[list[BlockHash], list[BlockHash]]:
        """(stored, removed) hashes since the last call, in order; removals apply after
        the stores of the same batch (a hash stored and evicted in one step is in both)."""
        if self._stored is None:
            return [], []
        stored, removed = self._stored, self._removed
        self._stored, self._removed = [], []
        return stored, removed

    # ---- invariants ----------------------------------------------------------------

    def counts(self) -> tuple[int, int, int]:
        """(free, cached, in use) block counts."""
        cached = sum(1 for b in self._free.values() if b.block_hash is not None)
        free = len(self._free) - cached
        in_use = sum(1 for b in self.blocks if b.ref_cnt > 0)
        return free, cached, in_use

    def check(self) -> None:
        """Assert the pool's invariants (tests and debugging)."""
        free, cached, in_use = self.counts()
        assert free + cached + in_use == self.num_blocks, (free, cached, in_use)
        for b in self.blocks:
            assert b.ref_cnt >= 0, b
            assert (b.ref_cnt == 0) == (b.block_id in self._free), b
            if b.block_hash is not None:
                assert self._cached.get(b.block_hash) is b, b
        for h, b in self._cached.items():
            assert b.block_hash == h, b
