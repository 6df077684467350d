"""KVCacheManager: which KV blocks each request holds, per KV cache group.

Contract with the scheduler:

* ``get_computed_blocks(req)`` finds the longest prefix of the request's tokens whose
  KV is cached in every group (always leaving the last token to compute, so there are
  logits), and returns each group's hit blocks.
* ``allocate_slots(req, n, hits)`` makes room for ``n`` more tokens after the already
  computed ones in every group, taking the hit blocks first; it returns None (changing
  nothing) when the pool cannot hold them, and the scheduler then preempts.
* ``free(req)`` drops the request's references at once.
* ``fork(parent, child)`` gives the child every block of the parent by reference; the
  first write into a block that is shared is preceded by a copy (copy-on-write). Copies
  are queued in ``pending_copies`` and travel to the worker in the next SchedulerOutput.

Groups (KVCacheLayout in config.py) share one block pool; each request holds one list of
blocks per group, all as long as each other: block i of every group's list holds token
positions [i * block_size, (i + 1) * block_size) for that group's layers.

Sliding-window groups (``free_outside_windows``): a block wholly before the window of
the next token to compute is freed at once and its place in the request's list is taken
by ``SLID_OUT`` (never read again: attention skips it), so a long generation holds a
bounded number of that group's blocks. A freed block that was full stays in the prefix
cache like any other. A prefix-cache hit on a sliding group needs only the blocks inside
the window of the first token to compute; the ones before it come back as ``SLID_OUT``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pagellm.core.block_pool import BlockHash, BlockPool, KVBlock, hash_block_tokens
from pagellm.core.kv_tier import KVTier
from pagellm.core.request import Request
from pagellm.utils import cdiv

SLID_OUT = KVBlock(block_id=0, ref_cnt=-1)
"""Stands for a block freed behind a sliding window (not part of the pool)."""


def held_blocks(blocks: Sequence[KVBlock]) -> list[KVBlock]:
    return [b for b in blocks if b is not SLID_OUT]


@dataclass
class PrefixCacheStats:
    """Counters since start-up, in tokens."""

    queries: int = 0
    hits: int = 0
    """Tokens found cached: in the main pool or in the second tier."""
    requests: int = 0


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        group_windows: Sequence[int | None] = (None,),
        record_events: bool = False,
        num_tier_slots: int = 0,
        write_through: bool = False,
    ) -> None:
        """``num_tier_slots``: blocks of the second KV tier (core/kv_tier.py; 0: none);
        ``write_through``: every block cached is copied there too, one step later (a
        persistent tier, so that a restart finds what the pool held)."""
        if not group_windows:
            raise ValueError("at least one KV cache group is needed")
        if num_tier_slots and len(group_windows) > 1:
            raise ValueError(
                "the second KV tier (kv_offload_size, swap_space) is not supported for "
                "models that mix attention kinds (several KV cache groups)"
            )
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.windows = tuple(group_windows)
        """Each group's sliding window (None: full attention)."""
        self._all_full = all(w is None for w in self.windows)
        self.pool = BlockPool(num_blocks, enable_caching, record_events)
        self.req_to_blocks: dict[str, list[list[KVBlock]]] = {}
        # How many leading blocks of each request are registered in the prefix cache, so
        # that a step looks only at the blocks filled since (not the whole list).
        self.num_cached_blocks: dict[str, int] = {}
        self.pending_copies: list[tuple[int, int]] = []
        # Per request and group: leading blocks freed behind a sliding window.
        self.num_slid_out: dict[str, list[int]] = {}
        # (group, index in its block table, new block id) of the last allocate_slots'
        # copy-on-write replacements.
        self.last_replaced: list[tuple[int, int, int]] = []
        self.prefix_stats = PrefixCacheStats()
        # The second tier: evicted cached blocks are copied there (pending_offloads:
        # block id, slot, hash) and hits on it loaded back (pending_loads: slot, block id);
        # the workers run both before the step's forward pass.
        self.tier = KVTier(num_tier_slots) if num_tier_slots else None
        self.pending_offloads: list[tuple[int, int, BlockHash]] = []
        self.pending_loads: list[tuple[int, int]] = []
        self._tier_hits: dict[str, list[BlockHash]] = {}
        if self.tier is not None:
            self.pool.on_evict = self._offload
        self.write_through = write_through and self.tier is not None
        # Blocks cached by the schedule() before the last one (computed by now), and by
        # the last one (computed in the step it scheduled): written through a step late.
        self._cached_prev: list[tuple[KVBlock, BlockHash]] = []
        self._cached_now: list[tuple[KVBlock, BlockHash]] = []

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def group_usage(self) -> tuple[float, ...]:
        """Each group's share of the pool's blocks held by requests (a block shared by
        prefix caching counts once). One group: the pool's usage."""
        if len(self.windows) == 1:
            return (self.pool.usage,)
        held: list[set[int]] = [set() for _ in self.windows]
        for groups in self.req_to_blocks.values():
            for g, blocks in enumerate(groups):
                held[g].update(b.block_id for b in blocks if b is not SLID_OUT)
        return tuple(len(ids) / self.pool.num_blocks for ids in held)

    def blocks_of(self, req_id: str) -> list[KVBlock]:
        """Every block the request holds, all groups together (SLID_OUT left out)."""
        return [b for blocks in self.req_to_blocks.get(req_id, ()) for b in held_blocks(blocks)]

    def _empty(self) -> list[list[KVBlock]]:
        return [[] for _ in self.windows]

    # ---- prefix cache --------------------------------------------------------------

    def _key(self, group: int, block_hash: BlockHash) -> BlockHash:
        """The cache key of a group's block: the same tokens differ per group."""
        return block_hash if group == 0 else block_hash + group.to_bytes(2, "little")

    def _update_block_hashes(self, request: Request) -> None:
        bs = self.block_size
        hashes = request.block_hashes
        tokens = request.all_token_ids
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(
                hash_block_tokens(parent, tokens[i * bs : (i + 1) * bs], request.cache_key)
            )

    def _first_visible_block(self, group: int, num_tokens: int) -> int:
        """The first block the token at position ``num_tokens`` can see in this group."""
        window = self.windows[group]
        if window is None:
            return 0
        return max(num_tokens + 1 - window, 0) // self.block_size

    def get_computed_blocks(self, request: Request) -> tuple[list[list[KVBlock]], int]:
        """Each group's cached blocks for the request's leading tokens, and how many
        tokens they hold (the same count for every group)."""
        if not self.enable_caching or request.needs_every_position:
            # Prompt logprobs (mean pooling) need every prompt position: none is skipped.
            return self._empty(), 0
        self._update_block_hashes(request)
        hashes = request.block_hashes[: (request.num_tokens - 1) // self.block_size]
        found: list[list[KVBlock | None]] = []
        n = len(hashes)
        for g, window in enumerate(self.windows):
            found.append([self.pool.get_cached_block(self._key(g, h)) for h in hashes[:n]])
            if window is None:  # full attention: the leading run of hits
                n = next((i for i, b in enumerate(found[g]) if b is None), n)
        # A sliding group needs the blocks in the window of the first token to compute:
        # move the hit length down past the highest missing one until none is.
        sliding = [g for g, w in enumerate(self.windows) if w is not None]
        while n > 0:
            missing = [
                i
                for g in sliding
                for i in range(self._first_visible_block(g, n * self.block_size), n)
                if found[g][i] is None
            ]
            if not missing:
                break
            n = max(missing)
        hits: list[list[KVBlock]] = []
        for g in range(self.num_groups):
            first = self._first_visible_block(g, n * self.block_size)
            hits.append([SLID_OUT] * first + [b for b in found[g][first:n] if b is not None])
        # The blocks after the main pool's run that the second tier holds: allocate_slots
        # gives them fresh blocks and loads them (one group only: see __init__).
        tier_hits: list[BlockHash] = []
        if self.tier is not None:
            for h in hashes[n:]:
                if h not in self.tier:
                    break
                tier_hits.append(h)
            self._tier_hits[request.req_id] = tier_hits
        num_hit = (n + len(tier_hits)) * self.block_size
        self.prefix_stats.requests += 1
        self.prefix_stats.queries += request.num_tokens
        self.prefix_stats.hits += num_hit
        return hits, num_hit

    def num_tier_hit_blocks(self, request: Request) -> int:
        """Blocks the last get_computed_blocks found in the second tier for the request."""
        return len(self._tier_hits.get(request.req_id, ()))

    def _offload(self, block: KVBlock, block_hash: BlockHash) -> None:
        assert self.tier is not None
        slot = self.tier.store(block_hash)
        if slot is not None:
            self.pending_offloads.append((block.block_id, slot, block_hash))

    def take_tier_ops(self) -> tuple[list[tuple[int, int, BlockHash]], list[tuple[int, int]]]:
        """(offloads, loads) for the workers to run before this step's forward pass;
        the slots being loaded stay pinned until the next call."""
        if self.tier is not None:
            self.tier.unpin_all()
        if self.write_through:
            for block, block_hash in self._cached_prev:
                # Still cached under that hash: its contents are the computed ones (a
                # block evicted since was offloaded by its eviction, or is gone).
                if block.block_hash == block_hash and block_hash not in self.tier:  # type: ignore[operator]
                    self._offload(block, block_hash)
            self._cached_prev, self._cached_now = self._cached_now, []
        out = self.pending_offloads, self.pending_loads
        self.pending_offloads, self.pending_loads = [], []
        return out

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        if not self.enable_caching:
            return
        self._update_block_hashes(request)
        done = self.num_cached_blocks.get(request.req_id, 0)
        full = min(num_tokens // self.block_size, len(request.block_hashes))
        for g, blocks in enumerate(self.req_to_blocks[request.req_id]):
            for i in range(done, full):
                if blocks[i] is not SLID_OUT and blocks[i].block_hash is None:
                    key = self._key(g, request.block_hashes[i])
                    self.pool.cache_block(blocks[i], key)
                    if self.write_through and blocks[i].block_hash == key:
                        self._cached_now.append((blocks[i], key))
        self.num_cached_blocks[request.req_id] = max(done, full)

    # ---- allocate / free -----------------------------------------------------------

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[Sequence[KVBlock]] | None = None,
        num_lookahead: int = 0,
    ) -> list[list[int]] | None:
        """Make room for num_new_tokens after the computed ones; None if they do not fit.

        On success the request's ``block_ids`` are updated in place and the ids of the
        blocks appended to each group's table returned (``last_replaced`` lists the
        copy-on-write replacements). Blocks that will be full once this step ran are
        registered in the prefix cache right away: the forward pass writes every layer's
        K/V before any attention reads it, so a request scheduled later in the same step
        may already share them. Only blocks full of the request's own (verified) tokens
        are registered: speculative proposals never enter the prefix cache.

        ``num_lookahead`` more slots are held past the new tokens without being computed
        by this step (a draft model writes its proposals' KV there).
        """
        bs = self.block_size
        hits = new_computed_blocks or self._empty()
        num_hits = len(hits[0])
        # Hits in the second tier (a waiting request's lookup): counted as computed, their
        # blocks allocated fresh below and loaded before the forward pass.
        tier_hits = (
            self._tier_hits.pop(request.req_id, []) if new_computed_blocks is not None else []
        )
        groups = self.req_to_blocks.get(request.req_id) or self._empty()
        num_computed = request.num_computed_tokens + (num_hits + len(tier_hits)) * bs
        num_total = num_computed + num_new_tokens
        num_held = num_total + num_lookahead
        # Shared blocks we are about to write into need a private copy first.
        first_write = num_computed // bs
        cow = [
            [i for i in range(first_write, min(len(blocks), cdiv(num_held, bs)))
             if blocks[i].ref_cnt > 1]
            for blocks in groups
        ]  # fmt: skip
        num_new_blocks = max(cdiv(num_held, bs) - len(groups[0]) - num_hits, 0)
        need = self.num_groups * num_new_blocks + sum(map(len, cow))
        reusable_hits = sum(1 for h in hits for b in held_blocks(h) if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - reusable_hits:
            return None
        assert self.tier is not None or not tier_hits
        # Pinned before any allocation below can evict into the tier.
        tier_slots = [self.tier.take(h) for h in tier_hits] if self.tier is not None else []
        if num_hits:
            slid = self.num_slid_out.setdefault(request.req_id, [0] * self.num_groups)
        self.req_to_blocks[request.req_id] = groups
        if len(request.block_ids) != self.num_groups:
            request.block_ids = [[] for _ in self.windows]
        appended: list[list[int]] = []
        self.last_replaced = []
        for hit in hits:  # every group's hits before any allocation can evict them
            self.pool.touch(held_blocks(hit))
        for g, blocks in enumerate(groups):
            if num_hits:
                slid[g] = max(slid[g], sum(1 for b in hits[g] if b is SLID_OUT))
            blocks.extend(hits[g])
            ids = request.block_ids[g]
            if len(ids) != len(blocks) - num_hits:
                ids[:] = [b.block_id for b in blocks[: len(blocks) - num_hits]]
            ids.extend(b.block_id for b in hits[g])
            for i in cow[g]:
                (copy,) = self.pool.allocate(1)
                self.pending_copies.append((blocks[i].block_id, copy.block_id))
                self.pool.free([blocks[i]])
                blocks[i] = copy
                ids[i] = copy.block_id
                self.last_replaced.append((g, i, copy.block_id))
            fresh = self.pool.allocate(num_new_blocks)
            blocks.extend(fresh)
            fresh_ids = [b.block_id for b in fresh]
            self.pending_loads.extend(zip(tier_slots, fresh_ids))
            ids.extend(fresh_ids)
            appended.append(fresh_ids)
        self._cache_full_blocks(request, min(num_total, request.num_tokens))
        return appended

    def trim(self, request: Request, num_tokens: int) -> int | None:
        """Free the request's blocks past those holding its first ``num_tokens`` positions
        (after speculative proposals were rejected); the number of blocks kept, or None
        when there was nothing to free."""
        groups = self.req_to_blocks.get(request.req_id)
        keep = cdiv(num_tokens, self.block_size)
        if not groups or len(groups[0]) <= keep:
            return None
        for blocks, ids in zip(groups, request.block_ids):
            dropped = held_blocks(blocks[keep:])
            del blocks[keep:]
            del ids[keep:]
            assert all(b.block_hash is None for b in dropped), "a cached block held proposals"
            self.pool.free(reversed(dropped))
        return keep

    def free(self, request: Request, offload: bool = True) -> None:
        """Drop the request's blocks. ``offload=False`` (preemption in recompute mode):
        those only it holds are not copied to the second tier when evicted."""
        groups = self.req_to_blocks.pop(request.req_id, [])
        self._tier_hits.pop(request.req_id, None)
        if not offload:
            for blocks in groups:
                for b in held_blocks(blocks):
                    if b.ref_cnt == 1:
                        b.offload = False
        self.num_cached_blocks.pop(request.req_id, None)
        self.num_slid_out.pop(request.req_id, None)
        # Last position first across every group, so that eviction takes a prompt's tail
        # in all groups before any group's head (a hit needs the head in every group).
        self.pool.free(
            b for i in reversed(range(len(groups[0]) if groups else 0)) for blocks in groups
            if (b := blocks[i]) is not SLID_OUT
        )  # fmt: skip
        request.block_ids = [[] for _ in self.windows]

    def free_outside_windows(self, request: Request) -> int:
        """Free, in every sliding group, the request's blocks that no token from its
        next one on can see; returns how many."""
        groups = self.req_to_blocks.get(request.req_id)
        if not groups or self._all_full:
            return 0
        slid = self.num_slid_out.setdefault(request.req_id, [0] * self.num_groups)
        freed = 0
        for g, blocks in enumerate(groups):
            if self.windows[g] is None:
                continue
            end = min(self._first_visible_block(g, request.num_computed_tokens), len(blocks))
            if end <= slid[g]:
                continue
            gone = held_blocks(blocks[slid[g] : end])
            blocks[slid[g] : end] = [SLID_OUT] * (end - slid[g])
            self.pool.free(reversed(gone))
            slid[g] = end
            freed += len(gone)
        return freed

    def fork(self, parent: Request, child: Request) -> None:
        """Share every block of the parent (partial last block included) with the child."""
        groups = self.req_to_blocks.get(parent.req_id) or self._empty()
        assert not any(self.req_to_blocks.get(child.req_id, ()))
        for blocks in groups:
            self.pool.touch(held_blocks(blocks))
        self.req_to_blocks[child.req_id] = [list(blocks) for blocks in groups]
        self.num_cached_blocks[child.req_id] = self.num_cached_blocks.get(parent.req_id, 0)
        if parent.req_id in self.num_slid_out:
            self.num_slid_out[child.req_id] = list(self.num_slid_out[parent.req_id])
        child.block_ids = [[b.block_id for b in blocks] for blocks in groups]
        child.block_hashes = list(parent.block_hashes)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
