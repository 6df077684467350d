"""Shared KV on the real model: forks for n > 1 and best_of, beam search against
transformers, and the automatic prefix cache."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.engine.llm_engine import LLMEngine
from tests.conftest import KV_BYTES_PER_TOKEN

EOS = 2


def run_and_track_blocks(
    engine: LLMEngine, requests: list[tuple[str, Any, SamplingParams]]
) -> tuple[dict[str, Any], int]:
    """Run requests to completion; return their final outputs and the peak blocks in use."""
    for req_id, prompt, params in requests:
        engine.add_request(req_id, prompt, params)
    outs: dict[str, Any] = {}
    peak = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        _, _, in_use = engine.core.scheduler.kv.pool.counts()
        peak = max(peak, in_use)
        engine.core.scheduler.check_invariants()
    return outs, peak


@pytest.fixture(scope="module")
def nocache_llm() -> LLM:
    return LLM(
        max_model_len=1024, kv_cache_memory="256MiB", enable_prefix_caching=False, dtype="float32"
    )


def test_n8_shares_the_prompt_and_matches_independent_requests(nocache_llm: LLM) -> None:
    engine = nocache_llm.engine
    rng = random.Random(0)
    prompt = [rng.randrange(100, 40000) for _ in range(512)]
    base = SamplingParams(temperature=0.9, seed=7, max_tokens=16, ignore_eos=True)
    shared, shared_peak = run_and_track_blocks(
        engine,
        [
            (
                "n8",
                prompt,
                SamplingParams(n=8, temperature=0.9, seed=7, max_tokens=16, ignore_eos=True),
            )
        ],
    )
    alone = []
    for i in range(8):
        p = base.clone()
        p.seed = 7 + i
        alone.append((f"solo{i}", prompt, p))
    solo, solo_peak = run_and_track_blocks(engine, alone)
    comps = shared["n8"].outputs
    assert [c.index for c in comps] == list(range(8))
    # Forking never corrupts a sibling: every sample equals its independent twin.
    assert [c.token_ids for c in comps] == [solo[f"solo{i}"].outputs[0].token_ids for i in range(8)]
    assert len({tuple(c.token_ids) for c in comps}) > 1
    # 512-token prompt: 8 x 33 blocks alone, 31 shared + 8 x 2 private when forked.
    assert solo_peak == 8 * 33
    assert shared_peak <= solo_peak / 4, (shared_peak, solo_peak)
    assert engine.core.scheduler.kv.pool.num_free_blocks == engine.core.scheduler.kv.num_blocks


def test_forks_survive_preemption() -> None:
    llm = LLM(
        max_model_len=256,
        kv_cache_memory=KV_BYTES_PER_TOKEN * 16 * 24,  # 24 blocks
        enable_prefix_caching=False,
        dtype="float32",
    )
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=60, ignore_eos=True)
    prompt = "A long time ago in a galaxy far, far away"
    relaxed = LLM(
        max_model_len=256, kv_cache_memory="64MiB", enable_prefix_caching=False, dtype="float32"
    )
    want = [c.token_ids for c in relaxed.generate(prompt, params, use_tqdm=False)[0].outputs]
    outs, _ = run_and_track_blocks(
        llm.engine, [("p", prompt, params), ("q", "Another prompt here", params)]
    )
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert [c.token_ids for c in outs["p"].outputs] == want


def test_best_of_returns_the_highest_cumulative_logprobs(smol_llm: Any) -> None:
    prompt = "My favourite animal is"
    best = smol_llm.generate(
        prompt,
        SamplingParams(n=2, best_of=5, temperature=1.0, seed=3, max_tokens=10),
        use_tqdm=False,
    )[0]
    samples = []
    for i in range(5):
        out = smol_llm.generate(
            prompt,
            SamplingParams(temperature=1.0, seed=3 + i, max_tokens=10, logprobs=0),
            use_tqdm=False,
        )[0].outputs[0]
        samples.append((out.cumulative_logprob, out.token_ids))
    samples.sort(key=lambda s: -s[0])
    assert [c.index for c in best.outputs] == [0, 1]
    assert [c.token_ids for c in best.outputs] == [s[1] for s in samples[:2]]
    for c, (cum, _) in zip(best.outputs, samples):
        assert c.cumulative_logprob == pytest.approx(cum, abs=1e-4)
        assert c.logprobs is None  # not asked for
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(best_of=3, temperature=0)


BEAM_CASES = [
    (
        "The capital of France is",
        dict(width=4, n=2, length_penalty=1.0, early_stopping=False, max_tokens=16),
    ),
    ("def add(a, b):", dict(width=3, n=3, length_penalty=0.5, early_stopping=True, max_tokens=14)),
    (
        "Q: What color is the sky?\nA:",
        dict(width=5, n=2, length_penalty=1.5, early_stopping=False, max_tokens=20),
    ),
    (
        "Once upon a time",
        dict(width=2, n=1, length_penalty=1.0, early_stopping="never", max_tokens=12),
    ),
]


@pytest.mark.parametrize(("prompt", "cfg"), BEAM_CASES)
def test_beam_search_equals_transformers(
    smol_llm: Any, hf_smol: Any, smol_tokenizer: Any, prompt: str, cfg: dict[str, Any]
) -> None:
    params = SamplingParams(
        use_beam_search=True,
        beam_width=cfg["width"],
        n=cfg["n"],
        length_penalty=cfg["length_penalty"],
        early_stopping=cfg["early_stopping"],
        max_tokens=cfg["max_tokens"],
    )
    out = smol_llm.generate(prompt, params, use_tqdm=False)[0]
    ids = smol_tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf_smol.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            num_beams=cfg["width"],
            num_return_sequences=cfg["n"],
            length_penalty=cfg["length_penalty"],
            early_stopping=cfg["early_stopping"],
            max_new_tokens=cfg["max_tokens"],
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
        )
    expected = []
    for seq in ref.sequences[:, ids.shape[1] :].tolist():
        expected.append(seq[: seq.index(EOS) + 1] if EOS in seq else seq)
    assert [c.token_ids for c in out.outputs] == expected
    for c, score in zip(out.outputs, ref.sequences_scores.tolist()):
        normalised = c.cumulative_logprob / len(c.token_ids) ** cfg["length_penalty"]
        assert normalised == pytest.approx(score, abs=2e-3)
        assert c.finish_reason == ("stop" if c.token_ids[-1] == EOS else "length")
        assert c.text == smol_tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_beam_search_frees_pruned_beams(smol_llm: Any) -> None:
    engine = smol_llm.engine
    params = SamplingParams(use_beam_search=True, beam_width=4, n=1, max_tokens=10)
    outs, peak = run_and_track_blocks(engine, [("beam", "Tell me about the moon.", params)])
    assert len(outs["beam"].outputs) == 1
    assert peak <= 4 * 2 + 1  # 4 beams, a few private blocks each, sharing the prompt
    assert engine.core.scheduler.kv.pool.counts()[2] == 0
    with pytest.raises(ValueError, match="top_p is not supported with use_beam_search"):
        SamplingParams(use_beam_search=True, top_p=0.5)
    with pytest.raises(ValueError, match="beam_width"):
        SamplingParams(use_beam_search=True, n=3, beam_width=2)


def test_prefix_cache_reuses_blocks_and_changes_nothing(smol_llm: Any, nocache_llm: LLM) -> None:
    system = "You are a meticulous assistant. " * 40
    questions = ["What is 2+2?", "Name a planet.", "Spell 'cat'."]
    params = SamplingParams(temperature=0, max_tokens=12)
    stats_before = smol_llm.engine.core.stats()
    first = smol_llm.generate(system + questions[0], params, use_tqdm=False)[0]
    rest = smol_llm.generate([system + q for q in questions[1:]], params, use_tqdm=False)
    stats_after = smol_llm.engine.core.stats()
    prompt_len = len(first.prompt_token_ids)
    for out in rest:
        # Every full block of the shared system prompt comes from the cache.
        assert (
            out.num_cached_tokens >= (len(smol_llm.get_tokenizer().encode(system)) // 16 - 1) * 16
        )
        assert out.num_cached_tokens < len(out.prompt_token_ids)
    assert stats_after.prefix_cache_hits - stats_before.prefix_cache_hits >= sum(
        o.num_cached_tokens for o in rest
    )
    assert stats_after.prefix_cache_queries - stats_before.prefix_cache_queries >= prompt_len
    uncached = nocache_llm.generate([system + q for q in questions], params, use_tqdm=False)
    assert [o.num_cached_tokens for o in uncached] == [0, 0, 0]
    assert [o.outputs[0].token_ids for o in uncached] == [
        o.outputs[0].token_ids for o in [first, *rest]
    ]
    # A different cache salt never shares blocks.
    salted = smol_llm.generate(
        {"prompt": system + questions[0], "cache_salt": "tenant-b"}, params, use_tqdm=False
    )[0]
    assert salted.num_cached_tokens == 0
    assert salted.outputs[0].token_ids == first.outputs[0].token_ids
