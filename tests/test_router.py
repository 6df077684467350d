"""The data-parallel router without a model: prefix index, load, LoRA, sessions, deaths,
and the KV events the block pool reports for it."""

from __future__ import annotations

import random

import pytest

from pagellm.core.block_pool import BlockPool
from pagellm.core.kv_cache_manager import KVCacheManager
from pagellm.core.request import Request
from pagellm.engine.router import PrefixIndex, Router, prompt_block_hashes
from pagellm.entrypoints.openai.serving_base import session_of
from pagellm.lora.request import LoRARequest
from pagellm.sampling_params import SamplingParams

BS = 16


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def test_hashes_are_the_kv_managers() -> None:
    lora = LoRARequest("a", 3, "/x")
    for cache_key_args in ({}, {"cache_salt": "s"}, {"lora_request": lora}):
        req = Request("r", tokens(1, 70), SamplingParams(), **cache_key_args)  # type: ignore[arg-type]
        kv = KVCacheManager(64, BS)
        kv._update_block_hashes(req)
        assert prompt_block_hashes(req.prompt_token_ids, BS, req.cache_key) == req.block_hashes
        assert len(req.block_hashes) == 4  # full blocks only


def test_block_pool_reports_what_it_caches_and_evicts() -> None:
    pool = BlockPool(2, record_events=True)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"x" * 32)
    pool.cache_block(b, b"y" * 32)
    assert pool.take_events() == ([b"x" * 32, b"y" * 32], [])
    assert pool.take_events() == ([], [])
    pool.free([b, a])  # b is evicted first
    (c,) = pool.allocate(1)
    assert c is b
    assert pool.take_events() == ([], [b"y" * 32])
    silent = BlockPool(2)
    (d,) = silent.allocate(1)
    silent.cache_block(d, b"z" * 32)
    assert silent.take_events() == ([], [])


def test_prefix_index_events_pending_and_expiry() -> None:
    hashes = prompt_block_hashes(tokens(2, 64), BS)
    idx = PrefixIndex(pending_ttl=10.0)
    assert idx.match(hashes, 0.0) == 0
    idx.apply_events(hashes[:3], [])
    assert idx.match(hashes, 0.0) == 3
    idx.apply_events([], [hashes[1]])  # a hole: only the blocks before it count
    assert idx.match(hashes, 0.0) == 1
    idx.add_pending(hashes, now=0.0)
    assert idx.match(hashes, 5.0) == 4
    assert idx.match(hashes, 11.0) == 1  # the pending ones expired (hashes[0] is stored)
    history = PrefixIndex(capacity=2, pending_ttl=None)
    history.add_pending(hashes, now=0.0)
    assert len(history) == 2  # bounded: the oldest dropped
    assert history.match(hashes, 1e9) == 0  # the head went first


def test_shared_prefixes_stay_together_and_the_rest_balances() -> None:
    """The issue's workload: 8 shared system prompts over 2 replicas, 16 in flight. The
    prefix hits reach at least 0.9x those of one replica (which misses only each system
    prompt's first request); random routing would reach about half."""
    router = Router(2, BS)
    systems = [tokens(100 + i, 256) for i in range(8)]
    in_flight: list[tuple[int, int]] = []  # (engine, tokens), the last 16 sent
    per_engine = [0, 0]
    rng = random.Random(0)
    for n in range(128):
        loads = [sum(t for e, t in in_flight if e == i) for i in range(2)]
        prompt = systems[rng.randrange(8)] + tokens(n, 32)
        d = router.route(prompt, loads)
        per_engine[d.engine] += 1
        in_flight = [*in_flight, (d.engine, len(prompt) - d.cached_tokens + 64)][-16:]
    single = (128 - 8) * 256
    assert router.stats.expected_cached_tokens >= 0.9 * single
    assert min(per_engine) >= 128 // 4  # both replicas work
    # Unrelated prompts with equal loads alternate.
    picks = [router.route(tokens(1000 + i, 40), [5, 5]).engine for i in range(4)]
    assert sorted(picks) == [0, 0, 1, 1]


def test_load_beats_a_small_hit_and_a_hit_beats_a_small_imbalance() -> None:
    router = Router(2, BS)
    prompt = tokens(3, 200)
    first = router.route(prompt, [0, 0])
    other = 1 - first.engine
    loads = [0, 0]
    loads[first.engine] = 100  # busier by less than the 192 cached tokens it saves
    d = router.route(prompt, loads)
    assert (d.engine, d.reason, d.cached_tokens) == (first.engine, "prefix", 192)
    loads[first.engine] = 1000  # busier by far more
    d = router.route(prompt, loads)
    assert (d.engine, d.reason) == (other, "load")


def test_lora_replica_preferred() -> None:
    router = Router(2, BS, max_loras_per_engine=1)
    a = router.route(tokens(4, 20), [0, 0], lora_id=7).engine
    loads = [0, 0]
    loads[a] = 50  # busier, but loading the adapter elsewhere costs more
    d = router.route(tokens(5, 20), loads, lora_id=7)
    assert (d.engine, d.reason) == (a, "lora")
    loads[a] = 1000  # far busier: the other replica loads the adapter too
    assert router.route(tokens(6, 20), loads, lora_id=7).engine == 1 - a


def test_sessions_stick_until_their_replica_dies() -> None:
    router = Router(3, BS)
    first = router.route(tokens(7, 30), [0, 0, 0], session="chat-1").engine
    busy = [0, 0, 0]
    busy[first] = 10_000
    assert router.route(tokens(8, 30), busy, session="chat-1").engine == first
    router.mark_dead(first)
    moved = router.route(tokens(9, 30), busy, session="chat-1")
    assert moved.engine != first and router.alive[moved.engine]
    assert router.route(tokens(10, 30), [0, 0, 0], session="chat-1").engine == moved.engine
    for e in range(3):
        router.mark_dead(e)
    with pytest.raises(RuntimeError, match="no engine replica is alive"):
        router.route(tokens(11, 30), [0, 0, 0])


def test_session_key_sources() -> None:
    class Body:
        user = "u1"
        prompt_cache_key = None
        metadata = None

    assert session_of({"x-session-id": "h"}, Body()) == "h"
    assert session_of({}, Body()) == "u1"
    Body.prompt_cache_key = "pck"  # type: ignore[assignment]
    assert session_of({}, Body()) == "pck"

    class Anthropic:
        def __init__(self) -> None:
            self.metadata = {"user_id": "a1"}

    assert session_of({}, Anthropic()) == "a1"
    assert session_of({}, None) is None
