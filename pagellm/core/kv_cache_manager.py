"""KVCacheManager: which KV blocks each request holds.

Contract with the scheduler:

* ``get_computed_blocks(req)`` finds the longest run of cached full blocks matching the
  request's tokens (always leaving the last token to compute, so there are logits).
* ``allocate_slots(req, n, hits)`` makes room for ``n`` more tokens after the already
  computed ones, taking the hit blocks first; it returns None (changing nothing) when
  the pool cannot hold them, and the scheduler then preempts.
* ``free(req)`` drops the request's references at once.
* ``fork(parent, child)`` gives the child every block of the parent by reference; the
  first write into a block that is shared is preceded by a copy (copy-on-write). Copies
  are queued in ``pending_copies`` and travel to the worker in the next SchedulerOutput.

Block i of a request holds token positions [i * block_size, (i + 1) * block_size).

Sliding-window models whose every layer slides (``free_outside_window``): a block wholly
before the window of the next token to compute is freed at once and its place in the
request's list is taken by ``SLID_OUT`` (never read again: attention skips it), so a
long generation holds a bounded number of blocks. A freed block that was full stays in
the prefix cache like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pagellm.core.block_pool import BlockPool, KVBlock, hash_block_tokens
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
    requests: int = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        # How many leading blocks of each request are registered in the prefix cache, so
        # that a step looks only at the blocks filled since (not the whole list).
        self.num_cached_blocks: dict[str, int] = {}
        self.pending_copies: list[tuple[int, int]] = []
        # Leading blocks of each request freed behind a sliding window.
        self.num_slid_out: dict[str, int] = {}
        # (index in the block table, new block id) of the last allocate_slots' copies.
        self.last_replaced: list[tuple[int, int]] = []
        self.prefix_stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    # ---- prefix cache --------------------------------------------------------------

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

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Cached blocks matching the request's leading tokens, and how many tokens they hold."""
        if not self.enable_caching or request.needs_every_position:
            # Prompt logprobs (mean pooling) need every prompt position: none is skipped.
            return [], 0
        self._update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        self.prefix_stats.requests += 1
        self.prefix_stats.queries += request.num_tokens
        self.prefix_stats.hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        if not self.enable_caching:
            return
        self._update_block_hashes(request)
        blocks = self.req_to_blocks[request.req_id]
        done = self.num_cached_blocks.get(request.req_id, 0)
        full = min(num_tokens // self.block_size, len(request.block_hashes))
        for i in range(done, full):
            if blocks[i].block_hash is None:
                self.pool.cache_block(blocks[i], request.block_hashes[i])
        self.num_cached_blocks[request.req_id] = max(done, full)

    # ---- allocate / free -----------------------------------------------------------

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVBlock] = (),
        num_lookahead: int = 0,
    ) -> list[int] | None:
        """Make room for num_new_tokens after the computed ones; None if they do not fit.

        On success the request's ``block_ids`` are updated in place and the ids of newly
        taken blocks returned (``last_replaced`` lists the copy-on-write replacements). Blocks that will be full once this step ran are registered in
        the prefix cache right away: the forward pass writes every layer's K/V before
        any attention reads it, so a request scheduled later in the same step may
        already share them. Only blocks full of the request's own (verified) tokens are
        registered: speculative proposals never enter the prefix cache.

        ``num_lookahead`` more slots are held past the new tokens without being computed
        by this step (a draft model writes its proposals' KV there).
        """
        bs = self.block_size
        blocks = self.req_to_blocks.setdefault(request.req_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * bs
        num_total = num_computed + num_new_tokens
        num_held = num_total + num_lookahead
        # Shared blocks we are about to write into need a private copy first.
        first_write = num_computed // bs
        cow = [
            i
            for i in range(first_write, min(len(blocks), cdiv(num_held, bs)))
            if blocks[i].ref_cnt > 1
        ]
        num_new_blocks = cdiv(num_held, bs) - len(blocks) - len(new_computed_blocks)
        num_new_blocks = max(num_new_blocks, 0)
        reusable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + len(cow) > self.pool.num_free_blocks - reusable_hits:
            return None
        self.pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        ids = request.block_ids
        if len(ids) != len(blocks) - len(new_computed_blocks):
            ids[:] = [b.block_id for b in blocks[: len(blocks) - len(new_computed_blocks)]]
        ids.extend(b.block_id for b in new_computed_blocks)
        new_ids: list[int] = []
        self.last_replaced = []
        for i in cow:
            (copy,) = self.pool.allocate(1)
            self.pending_copies.append((blocks[i].block_id, copy.block_id))
            self.pool.free([blocks[i]])
            blocks[i] = copy
            ids[i] = copy.block_id
            new_ids.append(copy.block_id)
            self.last_replaced.append((i, copy.block_id))
        fresh = self.pool.allocate(num_new_blocks)
        blocks.extend(fresh)
        fresh_ids = [b.block_id for b in fresh]
        ids.extend(fresh_ids)
        new_ids.extend(fresh_ids)
        self._cache_full_blocks(request, min(num_total, request.num_tokens))
        return new_ids

    def trim(self, request: Request, num_tokens: int) -> int | None:
        """Free the request's blocks past those holding its first ``num_tokens`` positions
        (after speculative proposals were rejected); the number of blocks kept, or None
        when there was nothing to free."""
        blocks = self.req_to_blocks.get(request.req_id)
        keep = cdiv(num_tokens, self.block_size)
        if not blocks or len(blocks) <= keep:
            return None
        dropped = blocks[keep:]
        del blocks[keep:]
        del request.block_ids[keep:]
        assert all(b.block_hash is None for b in dropped), "a cached block held proposals"
        self.pool.free(reversed(dropped))
        return keep

    def free(self, request: Request) -> None:
        blocks = self.req_to_blocks.pop(request.req_id, [])
        self.num_cached_blocks.pop(request.req_id, None)
        self.num_slid_out.pop(request.req_id, None)
        self.pool.free(reversed(held_blocks(blocks)))
        request.block_ids = []

    def free_outside_window(self, request: Request, window: int) -> int:
        """Free the request's blocks that no token from its next one on can see (every
        layer attends to the last ``window`` positions only); returns how many."""
        blocks = self.req_to_blocks.get(request.req_id)
        if not blocks:
            return 0
        first_visible = request.num_computed_tokens + 1 - window
        end = min(max(first_visible, 0) // self.block_size, len(blocks))
        start = self.num_slid_out.get(request.req_id, 0)
        if end <= start:
            return 0
        gone = blocks[start:end]
        blocks[start:end] = [SLID_OUT] * (end - start)
        self.pool.free(reversed(held_blocks(gone)))
        self.num_slid_out[request.req_id] = end
        return len(held_blocks(gone))

    def fork(self, parent: Request, child: Request) -> None:
        """Share every block of the parent (partial last block included) with the child."""
        blocks = self.req_to_blocks.get(parent.req_id, [])
        assert child.req_id not in self.req_to_blocks or not self.req_to_blocks[child.req_id]
        self.pool.touch(held_blocks(blocks))
        self.req_to_blocks[child.req_id] = list(blocks)
        self.num_cached_blocks[child.req_id] = self.num_cached_blocks.get(parent.req_id, 0)
        if parent.req_id in self.num_slid_out:
            self.num_slid_out[child.req_id] = self.num_slid_out[parent.req_id]
        child.block_ids = [b.block_id for b in blocks]
        child.block_hashes = list(parent.block_hashes)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
