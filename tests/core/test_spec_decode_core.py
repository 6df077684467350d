"""Speculative decoding in the scheduler and the KV cache manager, with no model: a stub
worker accepts a chosen number of each step's proposals, so every property here is about
the bookkeeping of rollback (blocks, the prefix cache, preemption, stops)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pagellm.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from pagellm.core.ngram_proposer import propose_ngram
from pagellm.core.request import Request, RequestStatus
from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagellm.core.scheduler import Scheduler
from pagellm.sampling_params import SamplingParams
from pagellm.utils import cdiv

BS = 4


def make_scheduler(
    num_blocks: int = 64,
    k: int = 4,
    caching: bool = True,
    method: str = "ngram",
    disable_by_batch_size: int = 8,
    budget: int = 64,
) -> Scheduler:
    spec = SpeculativeConfig(
        method, k, prompt_lookup_min=1, prompt_lookup_max=3,
        disable_by_batch_size=disable_by_batch_size,
    )  # fmt: skip
    return Scheduler(
        SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget, max_model_len=256),
        CacheConfig(block_size=BS, enable_prefix_caching=caching),
        num_blocks,
        speculative=spec,
    )


def repeating_request(req_id: str, max_tokens: int = 40, **params: object) -> Request:
    """A prompt that repeats, so n-gram lookup always finds something to propose."""
    prompt = [10, 11, 12, 13, 14, 15] * 3
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params)  # type: ignore[arg-type]
    return Request(req_id, prompt, sp, (2,), 256)


def run_step(s: Scheduler, accept: dict[str, int] | int, bonus: int = 10) -> SchedulerOutput:
    """One step: each sampling request keeps ``accept`` of its proposals (capped by how
    many it has) and gets ``bonus`` after them."""
    out = s.schedule()
    sampled = []
    for req_id in out.num_scheduled_tokens:
        r = s.requests[req_id]
        spec = out.scheduled_spec_tokens.get(req_id, [])
        if r.num_computed_tokens < r.num_tokens:
            sampled.append([])
            continue
        n = accept if isinstance(accept, int) else accept.get(req_id, 0)
        sampled.append([*spec[: min(n, len(spec))], bonus])
    s.update_from_output(out, ModelRunnerOutput(list(out.num_scheduled_tokens), sampled))
    s.check_invariants()
    check_spec_invariants(s)
    return out


def check_spec_invariants(s: Scheduler) -> None:
    """After a step: no request computes past its verified tokens, holds blocks beyond
    them (plus a draft's lookahead), or has a prefix-cache block with unverified tokens."""
    assert s.spec is not None
    for r in s.running:
        assert r.num_computed_tokens <= r.num_tokens
        (blocks,) = s.kv.req_to_blocks[r.req_id]
        assert len(blocks) <= cdiv(r.num_tokens + s.spec.num_lookahead_tokens, BS), r
        for i, b in enumerate(blocks):
            if b.block_hash is not None:
                assert (i + 1) * BS <= r.num_tokens
                assert b.block_hash == r.block_hashes[i]


def test_ngram_proposals_follow_the_latest_earlier_match() -> None:
    assert propose_ngram([1, 2, 3, 4, 5, 1, 2, 3], 3, 1, 3) == [4, 5, 1]
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2, 2, 3) == [7, 1]
    assert propose_ngram([1, 2, 3], 2, 2, 2) == []  # no earlier occurrence
    assert propose_ngram([4, 4, 4, 4], 3, 1, 3) == [4]  # cut at the end of the sequence
    assert propose_ngram([1, 2, 1, 2], 0, 1, 2) == []


def test_proposals_are_verified_and_rejected_ones_rolled_back() -> None:
    s = make_scheduler()
    r = repeating_request("a")
    s.add_request(r)
    run_step(s, 0)  # the prompt; n-gram proposals for the next step
    assert r.num_output_tokens == 1 and r.spec_token_ids
    proposals = list(r.spec_token_ids)
    before_tokens = r.num_tokens
    out = run_step(s, 2)  # keep 2 of them, plus the step's own token
    assert out.scheduled_spec_tokens["a"] == proposals
    assert out.num_scheduled_tokens["a"] == 1 + len(proposals)
    assert r.output_token_ids[1:] == [*proposals[:2], 10]
    assert r.num_tokens == before_tokens + 3
    # Rejected positions are taken back: the last token is still to compute.
    assert r.num_computed_tokens == r.num_tokens - 1
    assert len(r.block_ids[0]) == cdiv(r.num_tokens, BS)
    assert s.spec_num_draft_tokens == len(proposals) and s.spec_num_accepted_tokens == 2


def test_worker_gets_each_token_once_through_the_scheduler() -> None:
    """Token ownership: the worker's copy grows only by the scheduler's deltas, accepted
    proposals included, and a trim of blocks reaches it as num_blocks_kept."""
    s = make_scheduler()
    r = repeating_request("a")
    s.add_request(r)
    mirror: list[int] = []
    blocks: list[int] = []
    for _ in range(12):
        out = s.schedule()
        for new in out.scheduled_new_reqs:
            mirror = [*new.prompt_token_ids, *new.output_token_ids]
            (blocks,) = [list(ids) for ids in new.block_ids]
        for cached in out.scheduled_cached_reqs:
            mirror.extend(cached.new_token_ids)
            if cached.num_blocks_kept is not None:
                del blocks[cached.num_blocks_kept :]
            for _, idx, b in cached.replaced_blocks:
                blocks[idx] = b
            blocks.extend(cached.new_block_ids[0])
        assert mirror == r.all_token_ids
        assert blocks[: len(r.block_ids[0])] == r.block_ids[0]
        sampled = [
            [*out.scheduled_spec_tokens.get("a", [])[:1], 10]
            if r.num_computed_tokens >= r.num_tokens else []
        ]  # fmt: skip
        s.update_from_output(out, ModelRunnerOutput(["a"], sampled))
        if r.is_finished:
            break


def test_prefix_cache_never_keeps_unverified_tokens() -> None:
    s = make_scheduler(k=6)
    r = repeating_request("a", max_tokens=30)
    s.add_request(r)
    for _ in range(6):
        run_step(s, 1)  # most proposals rejected every step
    cached = {b.block_hash for b in s.kv.pool.blocks if b.block_hash is not None}
    assert cached <= set(r.block_hashes)
    # A second request with the same verified tokens hits the cache only for them.
    twin = Request("b", list(r.all_token_ids), SamplingParams(max_tokens=1), (2,), 256)
    (hits,), n = s.kv.get_computed_blocks(twin)
    assert n == len(hits) * BS and len(hits) >= 4
    assert [b.block_id for b in hits] == r.block_ids[0][: len(hits)]


def test_preemption_with_proposals_in_flight() -> None:
    s = make_scheduler(num_blocks=14, caching=False)
    a = repeating_request("a", max_tokens=30)
    b = repeating_request("b", max_tokens=30)
    s.add_request(a)
    s.add_request(b)
    preempted = False
    for _ in range(200):
        if not s.has_unfinished_requests():
            break
        run_step(s, 3)
        for r in (a, b):
            if r.status == RequestStatus.PREEMPTED:
                preempted = True
                assert r.spec_token_ids == [] and r.num_computed_tokens == 0
                assert not s.kv.req_to_blocks.get(r.req_id)
    assert preempted, "the pool was meant to be too small for both"
    assert a.num_output_tokens == 30 and b.num_output_tokens == 30
    assert s.kv.pool.num_free_blocks == 14


def test_stop_token_among_accepted_tokens_ends_the_request_there() -> None:
    s = make_scheduler()
    r = Request("a", [10, 11, 12, 13, 14, 15] * 3, SamplingParams(max_tokens=40), (13,), 256)
    s.add_request(r)
    run_step(s, 0, bonus=10)  # output 10: proposals 11, 12, 13 (EOS), ...
    assert r.spec_token_ids[:3] == [11, 12, 13]
    run_step(s, 4, bonus=50)
    assert r.output_token_ids == [10, 11, 12, 13]
    assert r.status == RequestStatus.FINISHED_STOPPED
    assert not s.kv.req_to_blocks.get("a")


def test_max_tokens_caps_the_proposals() -> None:
    s = make_scheduler(k=8)
    r = repeating_request("a", max_tokens=4)
    s.add_request(r)
    run_step(s, 0)
    out = run_step(s, 8)
    # 1 generated, 3 to go: at most 2 proposals plus the step's own token.
    assert len(out.scheduled_spec_tokens["a"]) == 2
    assert r.num_output_tokens == 4 and r.is_finished


def test_per_request_switch_and_auto_off_at_large_batches() -> None:
    s = make_scheduler(disable_by_batch_size=2)
    off = repeating_request("off", num_speculative_tokens=0)
    two = repeating_request("two", num_speculative_tokens=2)
    s.add_request(off)
    s.add_request(two)
    run_step(s, 0)
    out = run_step(s, 0)
    assert "off" not in out.scheduled_spec_tokens
    assert len(out.scheduled_spec_tokens["two"]) == 2
    s.add_request(repeating_request("third"))
    run_step(s, 0)  # three running now: above disable_by_batch_size
    out = run_step(s, 0)
    assert out.scheduled_spec_tokens == {}


def test_draft_model_lookahead_slots_are_held_then_trimmed() -> None:
    k = 3
    s = make_scheduler(k=k, method="draft_model")
    r = repeating_request("a")
    s.add_request(r)
    out = s.schedule()
    # The draft proposes after this step: its writes (k slots) are allocated.
    assert out.draft_propose == {"a": k}
    assert len(r.block_ids[0]) == cdiv(r.num_tokens + k, BS)
    s.update_from_output(out, ModelRunnerOutput(["a"], [[99]], draft_token_ids={"a": [10, 11, 12]}))
    assert r.spec_token_ids == [10, 11, 12]
    out = s.schedule()
    assert out.scheduled_spec_tokens == {"a": [10, 11, 12]}
    s.update_from_output(out, ModelRunnerOutput(["a"], [[10, 98]], draft_token_ids={"a": [1]}))
    s.check_invariants()
    check_spec_invariants(s)
    assert len(r.block_ids[0]) == cdiv(r.num_tokens + k - 1, BS)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(12, 40), k=st.integers(1, 6))
def test_random_acceptance_keeps_every_invariant(seed: int, num_blocks: int, k: int) -> None:
    rng = random.Random(seed)
    s = make_scheduler(num_blocks=num_blocks, k=k, budget=24)
    reqs = [repeating_request(f"r{i}", max_tokens=rng.randint(1, 25)) for i in range(4)]
    for r in reqs:
        s.add_request(r)
    for _ in range(500):
        if not s.has_unfinished_requests():
            break
        accept = {r.req_id: rng.randint(0, k) for r in reqs}
        run_step(s, accept, bonus=rng.choice([10, 11, 99]))
    assert not s.has_unfinished_requests()
    for r in reqs:
        assert r.num_output_tokens == r.max_tokens
    assert s.kv.pool.num_free_blocks == num_blocks
