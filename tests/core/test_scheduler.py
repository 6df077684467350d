"""Scheduler and KV cache manager without a model: the model is a stub that 'samples'
a fixed token, so every property here is about bookkeeping."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagellm.config import CacheConfig, SchedulerConfig
from pagellm.core.request import Request, RequestStatus
from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagellm.core.scheduler import Scheduler
from pagellm.sampling_params import SamplingParams


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    budget: int = 32,
    max_num_seqs: int = 16,
    caching: bool = False,
    max_model_len: int = 256,
    policy: str = "fcfs",
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=max_model_len,
            policy=policy,
        ),
        CacheConfig(block_size=block_size, enable_prefix_caching=caching),
        num_blocks,
    )


def make_request(req_id: str, prompt_len: int, max_tokens: int, first_token: int = 100) -> Request:
    prompt = [first_token + i for i in range(prompt_len)]
    return Request(
        req_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), (2,), 256
    )


def fake_run(sched: SchedulerOutput, token: int = 7) -> ModelRunnerOutput:
    """Sample `token` for every request whose computed tokens reach its end."""
    return ModelRunnerOutput(
        req_ids=list(sched.num_scheduled_tokens),
        sampled_token_ids=[[token] for _ in sched.num_scheduled_tokens],
    )


def step(s: Scheduler) -> SchedulerOutput:
    out = s.schedule()
    sampled = []
    for req_id in out.num_scheduled_tokens:
        r = s.requests[req_id]
        sampled.append([7] if r.num_computed_tokens == r.num_tokens else [])
    s.update_from_output(out, ModelRunnerOutput(list(out.num_scheduled_tokens), sampled))
    s.check_invariants()
    return out


def run_to_completion(s: Scheduler, limit: int = 10_000) -> int:
    steps = 0
    while s.has_unfinished_requests():
        step(s)
        steps += 1
        assert steps < limit, "scheduler made no progress"
    return steps


def test_blocks_allocated_on_demand_and_freed_at_finish() -> None:
    s = make_scheduler(num_blocks=16, block_size=4, budget=64)
    r = make_request("a", 6, max_tokens=5)
    s.add_request(r)
    out = step(s)
    assert out.num_scheduled_tokens == {"a": 6}
    assert len(r.block_ids[0]) == 2  # 6 tokens -> 2 blocks
    assert r.output_token_ids == [7]
    step(s)  # token 7 at position 6 -> still 2 blocks
    assert len(r.block_ids[0]) == 2
    step(s)  # position 7
    step(s)  # position 8 needs a third block
    assert len(r.block_ids[0]) == 3
    run_to_completion(s)
    assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert r.num_output_tokens == 5 and r.block_ids == [[]]
    assert s.kv.pool.num_free_blocks == 16


def test_chunked_prefill_runs_beside_decodes_in_fcfs_order() -> None:
    s = make_scheduler(num_blocks=64, block_size=4, budget=10)
    a = make_request("a", 3, max_tokens=20)
    s.add_request(a)
    step(s)  # a prefilled
    b = make_request("b", 25, max_tokens=3)
    c = make_request("c", 4, max_tokens=3)
    s.add_request(b)
    s.add_request(c)
    out = step(s)
    # Running request first (1 decode token), then b's first chunk fills the budget.
    assert list(out.num_scheduled_tokens.items()) == [("a", 1), ("b", 9)]
    out = step(s)
    assert list(out.num_scheduled_tokens.items()) == [("a", 1), ("b", 9)]
    assert b.output_token_ids == []  # mid-prefill: nothing sampled
    out = step(s)
    # b's last 7 tokens; c gets the 2 left in the budget: its prefill is chunked too.
    assert list(out.num_scheduled_tokens.items()) == [("a", 1), ("b", 7), ("c", 2)]
    assert b.output_token_ids == [7] and c.output_token_ids == []
    run_to_completion(s)


def test_max_num_seqs_limits_running_requests() -> None:
    s = make_scheduler(num_blocks=256, budget=1000, max_num_seqs=3)
    reqs = [make_request(str(i), 5, max_tokens=4) for i in range(8)]
    for r in reqs:
        s.add_request(r)
    while s.has_unfinished_requests():
        out = step(s)
        assert len(out.num_scheduled_tokens) <= 3
        assert s.num_running <= 3
    assert all(r.num_output_tokens == 4 for r in reqs)


def test_preemption_under_memory_pressure_loses_nothing() -> None:
    # 12 blocks of 4 tokens: three requests of 4 + 20 tokens cannot all fit.
    s = make_scheduler(num_blocks=12, block_size=4, budget=64)
    reqs = [make_request(str(i), 4, max_tokens=20, first_token=100 * (i + 1)) for i in range(3)]
    for r in reqs:
        s.add_request(r)
    run_to_completion(s)
    assert s.num_preemptions > 0
    for r in reqs:
        assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED
        assert r.output_token_ids == [7] * 20
    assert s.kv.pool.num_free_blocks == 12


def test_newest_running_request_is_preempted_first() -> None:
    # 12 blocks = 48 tokens: each request (8 + 30 tokens) fits alone, not both.
    s = make_scheduler(num_blocks=12, block_size=4, budget=64)
    old = make_request("old", 8, max_tokens=30)
    new = make_request("new", 8, max_tokens=30)
    s.add_request(old)
    s.add_request(new)
    step(s)
    preempted_seen = False
    while not preempted_seen:
        step(s)
        preempted_seen = new.status == RequestStatus.PREEMPTED
        assert old.status == RequestStatus.RUNNING
    assert new.num_computed_tokens == 0 and new.block_ids == [[]]
    assert s.waiting[0] is new
    run_to_completion(s)
    assert new.num_output_tokens == 30 and old.num_output_tokens == 30


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_priority_policy_admits_and_preempts_by_priority(policy: str) -> None:
    # Waiting order: by priority under the priority policy, by arrival under FCFS.
    s = make_scheduler(num_blocks=64, max_num_seqs=1, policy=policy)
    reqs = [make_request(f"r{p}", 4, max_tokens=2) for p in (3, -1, 0)]
    for r, p in zip(reqs, (3, -1, 0)):
        r.priority = p
        s.add_request(r)
    order = ["r-1", "r0", "r3"] if policy == "priority" else ["r3", "r-1", "r0"]
    assert [r.req_id for r in s.waiting] == order
    # Memory pressure: 12 blocks = 48 tokens; two requests of 8 + 30 tokens do not both
    # fit. The less important one started first: FCFS preempts the newest (important)
    # one, the priority policy the least important (older) one.
    s = make_scheduler(num_blocks=12, block_size=4, budget=64, policy=policy)
    low = make_request("low", 8, max_tokens=30)
    low.priority = 5
    s.add_request(low)
    step(s)
    high = make_request("high", 8, max_tokens=30)
    high.priority = -1
    s.add_request(high)
    preempted = set()
    while s.has_unfinished_requests():
        step(s)
        preempted |= {r.req_id for r in (low, high) if r.status == RequestStatus.PREEMPTED}
    assert preempted == ({"low"} if policy == "priority" else {"high"})
    assert high.num_output_tokens == 30 and low.num_output_tokens == 30


def test_abort_frees_blocks_and_tells_the_worker() -> None:
    s = make_scheduler()
    r = make_request("a", 10, max_tokens=50)
    s.add_request(r)
    step(s)
    assert r.block_ids[0]
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert r.block_ids == [[]] and s.kv.pool.num_free_blocks == s.kv.pool.num_blocks
    out = s.schedule()
    assert out.finished_req_ids == {"a"}
    s.check_invariants()


def test_stop_token_and_eos() -> None:
    s = make_scheduler()
    r = Request("a", [5, 6], SamplingParams(max_tokens=10, stop_token_ids=[7]), (2,), 256)
    s.add_request(r)
    step(s)
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason == 7
    r2 = Request(
        "b", [5, 6], SamplingParams(max_tokens=10, min_tokens=3, stop_token_ids=[7]), (2,), 256
    )
    s.add_request(r2)
    run_to_completion(s)
    assert r2.num_output_tokens == 3  # min_tokens holds the stop token back twice


def test_max_model_len_caps_generation() -> None:
    s = make_scheduler(max_model_len=20)
    r = Request(
        "a", list(range(100, 115)), SamplingParams(max_tokens=None, ignore_eos=True), (2,), 20
    )
    s.add_request(r)
    run_to_completion(s)
    assert r.num_tokens == 20 and r.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_prefix_cache_hit_skips_computed_blocks() -> None:
    s = make_scheduler(num_blocks=64, block_size=4, budget=100, caching=True)
    a = make_request("a", 10, max_tokens=2)
    s.add_request(a)
    run_to_completion(s)
    b = make_request("b", 10, max_tokens=2)  # same tokens
    s.add_request(b)
    out = step(s)
    # 2 full blocks (8 tokens) are cached; the rest is computed.
    assert out.num_scheduled_tokens == {"b": 2}
    assert b.num_cached_tokens == 8
    run_to_completion(s)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 25)), min_size=1, max_size=10),
    num_blocks=st.integers(10, 40),
    budget=st.integers(8, 64),
    max_num_seqs=st.integers(1, 8),
    caching=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_random_workloads_finish_with_invariants(
    lengths: list[tuple[int, int]],
    num_blocks: int,
    budget: int,
    max_num_seqs: int,
    caching: bool,
    seed: int,
) -> None:
    """Any mix of requests under any memory pressure finishes; nothing leaks."""
    block_size = 4
    # The plan guarantees one full-length request fits: keep that promise here too.
    max_len = num_blocks * block_size
    s = make_scheduler(num_blocks, block_size, budget, max_num_seqs, caching, max_model_len=max_len)
    rng = random.Random(seed)
    reqs = []
    for i, (p, o) in enumerate(lengths):
        p = min(p, max_len - 1)
        first = rng.choice([100, 200])  # shared prefixes sometimes
        r = make_request(str(i), p, max_tokens=o, first_token=first)
        r.max_tokens = min(o, max_len - p)
        reqs.append(r)
        s.add_request(r)
    aborted = set()
    steps = 0
    while s.has_unfinished_requests():
        step(s)
        steps += 1
        if rng.random() < 0.05 and s.running:
            victim = rng.choice(s.running)
            s.finish_requests([victim.req_id], RequestStatus.FINISHED_ABORTED)
            aborted.add(victim.req_id)
        assert steps < 5000
    for r in reqs:
        assert r.is_finished
        if r.req_id not in aborted:
            assert r.num_output_tokens == r.max_tokens
    assert s.kv.pool.num_free_blocks == num_blocks
    s.check_invariants()


def test_duplicate_request_id_is_refused() -> None:
    s = make_scheduler()
    s.add_request(make_request("a", 3, 2))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(make_request("a", 3, 2))


def make_family(n: int, prompt_len: int, max_tokens: int) -> Request:
    prompt = [100 + i for i in range(prompt_len)]
    reqs = [
        Request(f"{i}_x", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), (2,), 256)
        for i in range(n)
    ]
    reqs[0].pending_forks = reqs[1:]
    return reqs[0]


def test_siblings_fork_after_the_shared_prefill() -> None:
    s = make_scheduler(num_blocks=64, block_size=4, budget=100)
    parent = make_family(3, 10, max_tokens=3)
    s.add_request(parent)
    out = step(s)
    # The prompt minus its last token, once; nothing is sampled yet.
    assert out.num_scheduled_tokens == {"0_x": 9}
    assert parent.output_token_ids == []
    out = step(s)
    # Forked: each sibling computes the last prompt token itself, sharing every block.
    assert out.num_scheduled_tokens == {"0_x": 1, "1_x": 1, "2_x": 1}
    assert {r.req_id for r in out.scheduled_new_reqs} == {"1_x", "2_x"}
    assert all(r.num_computed_tokens == 9 for r in out.scheduled_new_reqs)
    blocks = [s.requests[r].block_ids[0] for r in ("0_x", "1_x", "2_x")]
    assert blocks[0][:2] == blocks[1][:2] == blocks[2][:2]  # the two full blocks stay shared
    assert len({b[2] for b in blocks}) == 3  # the partial one was copied on write
    assert len(out.block_copies) == 2
    run_to_completion(s)
    assert s.kv.pool.num_free_blocks == 64


def test_aborting_a_fork_parent_hands_the_family_over() -> None:
    s = make_scheduler(num_blocks=64, block_size=4, budget=4)
    parent = make_family(3, 10, max_tokens=2)
    s.add_request(parent)
    step(s)  # 4 of 9 prompt tokens
    s.finish_requests(["0_x"], RequestStatus.FINISHED_ABORTED)
    heir = s.requests["1_x"]
    assert heir.pending_forks == [s.requests["2_x"]] and s.waiting[0] is heir
    s.finish_requests(["2_x"], RequestStatus.FINISHED_ABORTED)  # a pending fork is just dropped
    assert heir.pending_forks == []
    run_to_completion(s)
    assert heir.num_output_tokens == 2
    assert "2_x" not in s.requests
