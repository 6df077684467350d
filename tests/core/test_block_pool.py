"""Block pool and KV cache manager under random allocate / fork / append / free / evict
sequences, against a simulated KV store: every request reads back exactly its own
tokens (a fork never corrupts a sibling), cached blocks hold what their hash says, and
free + cached + in use = total. With KV cache groups (a full-attention group beside
sliding-window ones, or sliding only), in every group: the positions a next token can
see read back, and blocks behind a window are freed."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagellm.core.block_pool import BlockPool, hash_block_tokens
from pagellm.core.kv_cache_manager import SLID_OUT, KVCacheManager
from pagellm.core.request import Request
from pagellm.sampling_params import SamplingParams

BS = 4


class Sim:
    """A KV cache manager plus a fake KV store written the way the worker writes it."""

    def __init__(self, num_blocks: int, windows: tuple[int | None, ...] = (None,)) -> None:
        self.kv = KVCacheManager(num_blocks, BS, enable_caching=True, group_windows=windows)
        self.windows = windows
        self.store: dict[tuple[int, int], int] = {}
        self.live: dict[str, Request] = {}
        self.seen_hashes: dict[bytes, list[int]] = {}
        self.n = 0

    def _compute(self, r: Request, n: int, hits: Any = None) -> bool:
        self.kv.free_outside_windows(r)  # as the scheduler does before allocating
        if self.kv.allocate_slots(r, n, hits) is None:
            return False
        r.num_computed_tokens += len(hits[0]) * BS if hits else 0
        # The worker runs queued copy-on-write copies before the step's writes.
        for src, dst in self.kv.take_pending_copies():
            for off in range(BS):
                if (src, off) in self.store:
                    self.store[(dst, off)] = self.store[(src, off)]
        for pos in range(r.num_computed_tokens, r.num_computed_tokens + n):
            for ids in r.block_ids:
                self.store[(ids[pos // BS], pos % BS)] = r.all_token_ids[pos]
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
        for r in self.live.values():
            for h, i in zip(r.block_hashes, range(len(r.block_hashes))):
                self.seen_hashes[h] = r.all_token_ids[i * BS : (i + 1) * BS]
            self.kv.free_outside_windows(r)  # what the next step starts with
            blocks = self.kv.req_to_blocks[r.req_id]
            assert len({len(b) for b in blocks} | {len(ids) for ids in r.block_ids}) == 1
            for g, window in enumerate(self.windows):
                # Every position the next token can see reads back the request's own token.
                first = 0 if window is None else max(r.num_computed_tokens + 1 - window, 0)
                for pos in range(first, r.num_computed_tokens):
                    got = self.store[(r.block_ids[g][pos // BS], pos % BS)]
                    assert got == r.all_token_ids[pos], (r, g, pos)
                # And a sliding group holds nothing wholly before that.
                if window is not None:
                    assert all(b is SLID_OUT for b in blocks[g][: first // BS]), (r, g)
        held = sum(len(self.kv.blocks_of(r)) for r in self.kv.req_to_blocks)
        assert held == sum(b.ref_cnt for b in pool.blocks)
        for block in pool.blocks:
            if block.block_hash is not None:
                tokens = self.seen_hashes[block.block_hash[:32]]  # a group's key: hash + group
                assert [self.store[(block.block_id, off)] for off in range(BS)] == tokens


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(6, 40),
    steps=st.integers(5, 60),
    windows=st.sampled_from([(None,), (None, 6, 6), (5,), (None, 9)]),
)
def test_random_operations_keep_every_invariant(
    seed: int, num_blocks: int, steps: int, windows: tuple[int | None, ...]
) -> None:
    rng = random.Random(seed)
    sim = Sim(num_blocks, windows)
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
    (pids,), (cids,) = parent.block_ids, child.block_ids
    assert cids == pids
    assert [sim.kv.pool.blocks[b].ref_cnt for b in pids] == [2, 2]
    sim.append(child, 7)  # writes into the shared partial block: copied first
    (pids,), (cids,) = parent.block_ids, child.block_ids
    assert cids[0] == pids[0] and cids[1] != pids[1]
    sim.append(parent, 9)  # the original is now private again: written in place
    sim.check()
    assert sim.store[(pids[1], 2)] == 9 and sim.store[(cids[1], 2)] == 7


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


def test_layout_groups_layers_by_kind() -> None:
    from pagellm.config import kv_cache_layout

    one = kv_cache_layout([None] * 5)
    assert one.windows == (None,) and one.num_slots == 5 and one.groups[0].layers == tuple(range(5))
    # Gemma 3 1B: 26 layers, every sixth global -> 4 global, 22 local in groups of 4.
    gemma = kv_cache_layout([None if (i + 1) % 6 == 0 else 512 for i in range(26)])
    assert gemma.num_slots == 4
    assert gemma.windows == (None,) + (512,) * 6
    assert gemma.groups[0].layers == (5, 11, 17, 23)
    assert [len(g.layers) for g in gemma.groups[1:]] == [4, 4, 4, 4, 4, 2]
    placement = gemma.placement()
    assert sorted(placement) == list(range(26))
    assert placement[11] == (0, 1) and placement[0] == (1, 0) and placement[25] == (6, 1)


def test_prefix_hit_needs_only_the_window_in_sliding_groups() -> None:
    """A full group needs every block of a hit; a sliding one only those in the window of
    the first token to compute (the rest come back as SLID_OUT), so a hit survives the
    eviction of a sliding group's old blocks but not of its recent ones."""
    kv = KVCacheManager(64, BS, enable_caching=True, group_windows=(None, 6))
    prompt = list(range(100, 125))  # 25 tokens: 6 full blocks
    first = Request("a", prompt, SamplingParams(max_tokens=4), (), 10_000)
    assert kv.allocate_slots(first, len(prompt)) is not None
    first.num_computed_tokens = len(prompt)
    kv.free(first)

    twin = Request("b", prompt, SamplingParams(max_tokens=4), (), 10_000)
    (full, sliding), n = kv.get_computed_blocks(twin)
    assert n == 24 and len(full) == len(sliding) == 6
    # The next token (position 24) sees positions 19..24: blocks 4 and 5 of the group.
    assert sliding[:4] == [SLID_OUT] * 4 and SLID_OUT not in sliding[4:] + full

    # Evict the sliding group's block 1 (outside every useful window): the hit stands.
    kv.pool.uncache_block(kv.pool.get_cached_block(kv._key(1, twin.block_hashes[1])))
    (_, sliding), n = kv.get_computed_blocks(twin)
    assert n == 24
    # Evict its block 5: the longest hit whose window is cached ends at 20 tokens
    # (position 20 sees 15..20: blocks 3 and 4).
    kv.pool.uncache_block(kv.pool.get_cached_block(kv._key(1, twin.block_hashes[5])))
    (full, sliding), n = kv.get_computed_blocks(twin)
    assert n == 20 and len(full) == len(sliding) == 5
    assert sliding[:3] == [SLID_OUT] * 3
    assert kv.allocate_slots(twin, len(prompt) - n, [full, sliding]) is not None
    assert [len(ids) for ids in twin.block_ids] == [7, 7]
    kv.pool.check()


def test_freed_request_is_evicted_tail_first_in_every_group() -> None:
    """A request's blocks go back last position first across the groups, so eviction
    takes every group's tail before any group's head and a prefix hit survives."""
    kv = KVCacheManager(16, BS, enable_caching=True, group_windows=(None, 1000))
    prompt = list(range(50, 75))  # 25 tokens: 7 blocks per group, 6 of them full
    first = Request("a", prompt, SamplingParams(max_tokens=4), (), 10_000)
    assert kv.allocate_slots(first, len(prompt)) is not None
    kv.free(first)
    other = Request("b", list(range(900, 925)), SamplingParams(max_tokens=4), (), 10_000)
    # 4 blocks per group: the 2 never used, both groups' partial blocks 6, then blocks 5
    # and 4 of both groups (cached: evicted). Freed group by group, group 0 would have
    # lost blocks 6 to 1 and the hit would be 1 block.
    assert kv.allocate_slots(other, 13) is not None
    twin = Request("c", prompt, SamplingParams(max_tokens=4), (), 10_000)
    _, n = kv.get_computed_blocks(twin)
    assert n == 4 * BS


def test_group_usage_counts_each_groups_blocks_once() -> None:
    """What the dashboard charts per KV cache group: a group's held blocks over the pool
    (a prefix-shared block once); the groups together are the pool's usage."""
    kv = KVCacheManager(40, BS, enable_caching=True, group_windows=(None, 4))
    assert kv.group_usage() == (0.0, 0.0)
    prompt = list(range(300, 320))  # 20 tokens: 5 blocks per group
    a = Request("a", prompt, SamplingParams(max_tokens=4), (), 10_000)
    assert kv.allocate_slots(a, len(prompt)) is not None
    assert kv.group_usage() == (5 / 40, 5 / 40)
    a.num_computed_tokens = len(prompt)
    twin = Request("b", prompt, SamplingParams(max_tokens=4), (), 10_000)
    hits, n = kv.get_computed_blocks(twin)
    assert n == 16
    assert kv.allocate_slots(twin, len(prompt) - n, hits) is not None
    # Per group: the 4 shared blocks once, plus each request's own last block.
    assert kv.group_usage() == (6 / 40, 6 / 40)
    assert abs(sum(kv.group_usage()) - kv.usage) < 1e-9
    kv.free(a)
    kv.free(twin)
    assert kv.group_usage() == (0.0, 0.0)
    single = KVCacheManager(8, BS)
    assert single.group_usage() == (single.usage,)
