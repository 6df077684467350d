"""The second KV tier: where blocks evicted from the main pool go instead of vanishing.

The main pool (block_pool.py) keeps a freed block's contents under its hash until the
block is reused. With a tier, reusing (evicting) it first copies its K/V into a tier
slot, keyed by the same hash; a later prompt whose next blocks are not in the main pool
but are in the tier gets fresh blocks loaded from there instead of running prefill. A
preempted request is the same case: its blocks are freed (their hashes kept), the pool
evicts them into the tier as it needs room, and the request's resume finds them there
(vLLM's swap on preemption, done lazily: a block is copied only if the pool reuses it
while the request waits).

    step N, in the scheduler            step N, in the workers (before the forward)
    --------------------------          -------------------------------------------
    evict block b (hash h) -> slot s    1. offloads: main block b -> tier slot s
    lookup h' -> slot s', new block b'  2. loads:    tier slot s' -> main block b'
                                        3. copy-on-write block copies

Offloads run first: the block they read may be reallocated (and loaded into) in the same
step. A slot read by this step's loads is pinned until the next ``schedule()`` (the
workers have run the step by then), so no offload of the same step overwrites it. The
tier is bookkeeping only (no tensors): slots are indexes into the workers' tier tensors
(worker/kv_cache.py), in host memory or in a file that survives a restart.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from pagellm.core.block_pool import BlockHash


class KVTier:
    """hash -> slot for ``num_slots`` slots, least recently used evicted first."""

    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise ValueError(f"the KV tier needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self._slots: OrderedDict[BlockHash, int] = OrderedDict()  # LRU order: head first
        self._free = list(range(num_slots - 1, -1, -1))
        self._pinned: set[int] = set()
        self.num_stored = 0
        """Blocks copied into the tier since start-up."""
        self.num_loaded = 0
        """Blocks copied back from it."""

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, block_hash: BlockHash) -> bool:
        return block_hash in self._slots

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._slots.get(block_hash)

    def store(self, block_hash: BlockHash) -> int | None:
        """A slot to copy an evicted block into; None if the hash is there already (the
        copy would be identical) or every slot is pinned."""
        if block_hash in self._slots:
            self._slots.move_to_end(block_hash)
            return None
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((h for h, s in self._slots.items() if s not in self._pinned), None)
            if victim is None:
                return None
            slot = self._slots.pop(victim)
        self._slots[block_hash] = slot
        self.num_stored += 1
        return slot

    def take(self, block_hash: BlockHash) -> int:
        """The slot of a hash about to be loaded back: pinned for this step, and most
        recently used (it stays in the tier: the main pool may evict it again)."""
        slot = self._slots[block_hash]
        self._slots.move_to_end(block_hash)
        self._pinned.add(slot)
        self.num_loaded += 1
        return slot

    def unpin_all(self) -> None:
        """The workers have run the step whose loads pinned slots."""
        self._pinned.clear()

    @property
    def num_pinned(self) -> int:
        return len(self._pinned)

    def restore(self, entries: Iterable[tuple[int, BlockHash]]) -> int:
        """Adopt (slot, hash) pairs that a persistent tier found valid at start-up."""
        n = 0
        taken = set(self._slots.values())
        for slot, block_hash in entries:
            if not 0 <= slot < self.num_slots or slot in taken or block_hash in self._slots:
                continue
            self._slots[block_hash] = slot
            taken.add(slot)
            n += 1
        self._free = [s for s in range(self.num_slots - 1, -1, -1) if s not in taken]
        return n

    def check(self) -> None:
        """Assert the tier's invariants (tests and debugging)."""
        used = list(self._slots.values())
        assert len(used) == len(set(used)), "two hashes share a slot"
        assert not set(used) & set(self._free), "a slot is both used and free"
        assert len(used) + len(self._free) == self.num_slots
