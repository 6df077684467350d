"""Block pool and KV cache manager under random allocate / fork / append / free / evict
sequences, against a simulated KV store: every request reads back exactly its own
tokens (a fork never corrupts a sibling), cached blocks hold what their hash says, and
free + cached + in use = total."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagellm.core.block_pool import BlockPool, hash_block_tokens
from pagellm.core.kv_cache_manager import KVCacheManager
from pagellm.core.request import Request
from pagellm.sampling_params import SamplingParams

BS = 4


class Sim:
    """A KV cache manager plus a fake KV store written the way the worker writes it."""

    def __init__(self, num_blocks: int) -> None:
        self.kv = KVCacheManager(num_blocks, BS, enable_caching=True)
        self.store: dict[tuple[int, int], int] = {}
        self.live: dict[str, Request] = {}
        self.seen_hashes: dict[bytes, list[int]] = {}
        self.n = 0

    def _compute(self, r: Request, n: int, hits: Any = ()) -> bool:
        if self.kv.allocate_slots(r, n, hits) is None:
            return False
        r.num_computed_tokens += len(hits) * BS
        # The worker runs queued copy-on-write copies before the step's writes.
        for src, dst in self.kv.take_pending_copies():
            for off in range(BS):
                if (src, off) in self.store:
                    self.store[(dst, off)] = self.store[(src, off)]
        for pos in range(r.num_computed_tokens, r.num_computed_tokens + n):
            self.store[(r.block_ids[pos // BS], pos % BS)] = r.all_token_ids[pos]
        r.num_computed_tokens += n
        return True

    def new(self, tokens: list[int]) -> None:
        self.n += 1
        r = Request(f"r{self.n}", tokens, SamplingParams(max_tokens=100), (), 10_000)
        hits, hit_tokens = self.kv.get_computed_blocks(r)
        if self._compute(r, len(tokens) - hit_tokens, hits):
            self.live[r.req_id] = r
        else:
            self.kv.free(r)

    def append(self, r: Request, token: int) -> None:
        r.append_output_token(token)
        if not self._compute(r, 1):
            r.output_token_ids.pop()
            r.all_token_ids.pop()
            r.block_hashes = r.block_hashes[: len(r.all_token_ids) // BS]

    def fork(self, r: Request) -> None:
        self.n += 1
        child = Request(f"r{self.n}", r.prompt_token_ids, r.sampling_params, (), 10_000)
        child.all_token_ids = list(r.all_token_ids)
        child.output_token_ids = list(r.output_token_ids)
        child.num_computed_tokens = r.num_computed_tokens
        self.kv.fork(r, child)
        self.live[child.req_id] = child

    def free(self, r: Request) -> None:
        self.kv.free(r)
        del self.live[r.req_id]

    def check(self) -> None:
        pool = self.kv.pool
        pool.check()
        free, cached, in_use = pool.counts()
        assert free + cached + in_use == pool.num_blocks
        assert all(b.ref_cnt >= 0 for b in pool.blocks)
        held = sum(len(v) for v in self.kv.req_to_blocks.values())
        assert held == sum(b.ref_cnt for b in pool.blocks)
        for r in self.live.values():
            for h, i in zip(r.block_hashes, range(len(r.block_hashes))):
                self.seen_hashes[h] = r.all_token_ids[i * BS : (i + 1) * BS]
            # Every computed position reads back the request's own token.
            for pos in range(r.num_computed_tokens):
                assert self.store[(r.block_ids[pos // BS], pos % BS)] == r.all_token_ids[pos], (
                    r,
                    pos,
                )
        for block in pool.blocks:
            if block.block_hash is not None:
                tokens = self.seen_hashes[block.block_hash]
                assert [self.store[(block.block_id, off)] for off in range(BS)] == tokens


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(6, 30), steps=st.integers(5, 60))
def test_random_operations_keep_every_invariant(seed: int, num_blocks: int, steps: int) -> None:
    rng = random.Random(seed)
    sim = Sim(num_blocks)
    prefixes = [[rng.randrange(3) for _ in range(rng.randrange(1, 14))] for _ in range(3)]
    for _ in range(steps):
        op = rng.random()
        live = list(sim.live.values())
        if op < 0.3 or not live:
            base = rng.choice(prefixes)
            sim.new(base + [rng.randrange(3) for _ in range(rng.randrange(0, 5))])
        elif op < 0.6:
            sim.append(rng.choice(live), rng.randrange(3))
        elif op < 0.75:
            sim.fork(rng.choice(live))
        else:
            sim.free(rng.choice(live))
        sim.check()
    for r in list(sim.live.values()):
        sim.free(r)
    sim.check()
    assert sim.kv.pool.num_free_blocks == num_blocks


def test_fork_shares_the_partial_block_and_copies_on_write() -> None:
    sim = Sim(16)
    sim.new([1, 2, 3, 4, 5, 6])  # blocks: [1 2 3 4] [5 6 _ _]
    parent = next(iter(sim.live.values()))
    sim.fork(parent)
    child = list(sim.live.values())[1]
    assert child.block_ids == parent.block_ids
    assert [sim.kv.pool.blocks[b].ref_cnt for b in parent.block_ids] == [2, 2]
    sim.append(child, 7)  # writes into the shared partial block: copied first
    assert child.block_ids[0] == parent.block_ids[0] and child.block_ids[1] != parent.block_ids[1]
    sim.append(parent, 9)  # the original is now private again: written in place
    sim.check()
    assert sim.store[(parent.block_ids[1], 2)] == 9 and sim.store[(child.block_ids[1], 2)] == 7


def test_freed_blocks_stay_cached_and_lru_evicts_oldest() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    h1, h2 = hash_block_tokens(None, [1]), hash_block_tokens(None, [2])
    pool.cache_block(a, h1)
    pool.cache_block(b, h2)
    pool.free([a])
    pool.free([b])
    assert pool.counts() == (2, 2, 0)
    assert pool.get_cached_block(h1) is a
    # A hit pulls a block back out of the free list.
    pool.touch([a])
    assert a.ref_cnt == 1 and pool.num_free_blocks == 3
    pool.free([a])
    # Allocation takes never-cached blocks first, then evicts the least recently freed.
    got = pool.allocate(3)
    assert b in got and a not in got
    assert pool.get_cached_block(h2) is None and pool.get_cached_block(h1) is a
    assert pool.num_cache_evictions == 1
    pool.check()
    with pytest.raises(ValueError, match="cannot allocate"):
        pool.allocate(2)
