"""The second KV tier as bookkeeping (no tensors): what the KV manager offloads when the
pool evicts, what it loads back on a hit, pinning, recompute mode and write-through."""

from __future__ import annotations

import pytest

from pagellm.core.kv_cache_manager import KVCacheManager
from pagellm.core.kv_tier import KVTier
from pagellm.core.request import Request
from pagellm.sampling_params import SamplingParams

BS = 4


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def admit(kv: KVCacheManager, r: Request) -> tuple[int, list[int]]:
    """What the scheduler does for a waiting request: lookup, then allocate."""
    hits, n = kv.get_computed_blocks(r)
    ids = kv.allocate_slots(r, r.num_tokens - n, hits)
    assert ids is not None
    r.num_computed_tokens = r.num_tokens
    return n, ids[0]


def test_tier_lru_pinning_and_restore() -> None:
    tier = KVTier(2)
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    assert tier.store(a) == 0 and tier.store(b) == 1
    assert tier.store(a) is None  # there already: nothing to copy
    assert tier.take(b) == 1  # pinned for this step, most recently used
    assert tier.store(c) == 0  # a (least recently used, unpinned) makes room
    assert tier.lookup(a) is None and tier.lookup(c) == 0
    tier.take(c)
    assert tier.store(a) is None  # every slot pinned: no room this step
    tier.unpin_all()
    assert tier.store(a) == 1  # b was used less recently than c
    tier.check()
    fresh = KVTier(3)
    assert fresh.restore([(2, a), (0, b), (2, c), (7, c)]) == 2  # a slot twice, out of range
    assert fresh.store(c) == 1
    fresh.check()
    with pytest.raises(ValueError, match="at least one slot"):
        KVTier(0)


def test_evicted_blocks_go_to_the_tier_and_come_back() -> None:
    kv = KVCacheManager(4, BS, num_tier_slots=8)
    first = req("a", list(range(9)))  # 2 full blocks + 1 token
    admit(kv, first)
    kv.free(first)
    kv.take_tier_ops()
    other = req("b", list(range(100, 116)))  # 4 blocks: evicts both of a's cached ones
    admit(kv, other)
    offloads, loads = kv.take_tier_ops()
    # Both, tail first (a prompt's tail is evicted before its head).
    assert [h for _, _, h in offloads] == first.block_hashes[1::-1]
    assert loads == []
    kv.free(other)
    again = req("c", list(range(9)))
    n, ids = admit(kv, again)
    assert n == 8  # both blocks from the tier (the main pool lost them)
    offloads, loads = kv.take_tier_ops()
    slots = [kv.tier.lookup(h) for h in first.block_hashes[:2]]  # type: ignore[union-attr]
    assert loads == list(zip(slots, ids[:2]))
    # The blocks b's allocation evicted now went to the tier too (one copy per hash).
    assert len(offloads) == len({h for _, _, h in offloads})
    kv.free(again)
    kv.pool.check()
    kv.tier.check()  # type: ignore[union-attr]
    assert kv.tier.num_loaded == 2  # type: ignore[union-attr]  # its 8 tokens


def test_a_slot_being_loaded_is_not_overwritten_in_the_same_step() -> None:
    kv = KVCacheManager(4, BS, num_tier_slots=2)
    first = req("a", list(range(9)))
    admit(kv, first)
    kv.free(first)
    admit(kv, fill := req("b", list(range(100, 116))))
    kv.free(fill)
    kv.take_tier_ops()  # a's 2 blocks fill the tier's 2 slots
    n, _ = admit(kv, req("c", list(range(9))))  # loads both: pinned
    assert n == 8
    offloads, loads = kv.take_tier_ops()
    assert len(loads) == 2
    assert {s for _, s, _ in offloads}.isdisjoint({s for s, _ in loads})


def test_recompute_mode_keeps_a_preempted_request_out_of_the_tier() -> None:
    kv = KVCacheManager(4, BS, num_tier_slots=8)
    victim = req("a", list(range(9)))
    admit(kv, victim)
    kv.free(victim, offload=False)  # preempted in recompute mode
    admit(kv, req("b", list(range(100, 116))))
    offloads, _ = kv.take_tier_ops()
    assert offloads == []


def test_write_through_copies_each_cached_block_one_step_later() -> None:
    kv = KVCacheManager(8, BS, num_tier_slots=8, write_through=True)
    r = req("a", list(range(9)))
    admit(kv, r)
    assert kv.take_tier_ops() == ([], [])  # computed by the step this schedule makes
    offloads, _ = kv.take_tier_ops()  # the next schedule: written through
    assert [h for _, _, h in offloads] == r.block_hashes[:2]
    assert kv.take_tier_ops() == ([], [])  # once


def test_several_groups_refuse_a_tier() -> None:
    with pytest.raises(ValueError, match="mix attention kinds"):
        KVCacheManager(8, BS, group_windows=(None, 32), num_tier_slots=4)
