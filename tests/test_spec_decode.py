"""Speculative decoding end to end: n-gram and draft-model proposals on the real model
give the same greedy tokens as ordinary decoding; the rejection sampler's output is
distributed as the target's (chi-square, on the sampler and through the engine on a tiny
model); the server reports acceptance in /metrics and takes the per-request switch."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.sample.sampler import Sampler, SamplingMetadata

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}

EDIT_PROMPT = (
    "Rename the variable `total` to `subtotal` in this code and print the whole code:\n"
    "def price(items):\n    total = 0\n    for item in items:\n        total += item.cost\n"
    "    if total > 100:\n        total = total * 0.9\n    return total\n"
)
PROMPTS = [
    EDIT_PROMPT,
    "List the days of the week, then list them again in the same order:",
    "The capital of France is",
]


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper quantile of chi-square (Wilson-Hilferty); z = 3.09 is p = 0.001."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(observed: list[int], expected: list[float]) -> float:
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected))


@pytest.fixture(scope="module")
def ngram_llm() -> Iterator[LLM]:
    # The same settings as smol_llm_default (the reference), plus speculation.
    yield LLM(max_model_len=1024, kv_cache_memory="256MiB", speculative_config=NGRAM)


def tokens(outs: list[Any]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_ngram_greedy_equals_ordinary_decoding(ngram_llm: LLM, smol_llm_default: LLM) -> None:
    params = [
        SamplingParams(temperature=0, max_tokens=64),
        SamplingParams(temperature=0, max_tokens=48, repetition_penalty=1.2, presence_penalty=0.3),
        SamplingParams(temperature=0, max_tokens=40, logprobs=2, num_speculative_tokens=2),
        SamplingParams(temperature=0, max_tokens=40, num_speculative_tokens=0),
        SamplingParams(temperature=0, max_tokens=64, stop=["total * 0.9"], min_tokens=5),
    ]
    prompts = [{"prompt": p} for p in PROMPTS]
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    for sp in params:
        ref = smol_llm_default.generate(prompts, sp, use_tqdm=False)
        out = ngram_llm.generate(prompts, sp, use_tqdm=False)
        assert tokens(out) == tokens(ref), sp
        assert [o.outputs[0].text for o in out] == [o.outputs[0].text for o in ref]
        if sp.logprobs:
            for o, r in zip(out, ref):
                for a, b in zip(o.outputs[0].logprobs, r.outputs[0].logprobs):
                    assert a.keys() == b.keys()
                    for t in a:
                        assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)
        if sp.num_speculative_tokens == 0:
            assert all(o.metrics.spec_num_draft_tokens == 0 for o in out)
    # Speculating and ordinary requests in one batch.
    mixed = [
        SamplingParams(temperature=0, max_tokens=48, num_speculative_tokens=n) for n in (4, 0, 1)
    ]
    out = ngram_llm.generate(prompts, mixed, use_tqdm=False)
    assert tokens(out) == tokens(smol_llm_default.generate(prompts, mixed, use_tqdm=False))
    assert out[1].metrics.spec_num_draft_tokens == 0 < out[0].metrics.spec_num_draft_tokens
    ref = smol_llm_default.chat(chats, SamplingParams(temperature=0, max_tokens=96), use_tqdm=False)
    out = ngram_llm.chat(chats, SamplingParams(temperature=0, max_tokens=96), use_tqdm=False)
    assert tokens(out) == tokens(ref)
    m = out[0].metrics
    # The edit repeats its prompt: proposals are verified and mostly accepted.
    assert m.spec_num_draft_tokens > 0 and m.spec_num_accepted_tokens > 0
    assert m.spec_acceptance_rate is not None and 0 < m.spec_acceptance_rate <= 1
    assert m.spec_mean_accepted_length is not None and m.spec_mean_accepted_length > 1.5
    ngram_llm.engine.core.scheduler.check_invariants()


def test_ngram_with_structured_outputs(ngram_llm: LLM, smol_llm_default: LLM) -> None:
    """Proposals pass through the grammar: the ones it refuses are cut, the matcher is
    rolled back, and the output equals the unspeculated constrained output."""
    regex = r"(Monday|Tuesday|Wednesday), (Monday|Tuesday|Wednesday), (Monday|Tuesday|Wednesday)"
    sp = SamplingParams(temperature=0, max_tokens=40, structured_outputs={"regex": regex})
    prompt = "Monday, Tuesday, Wednesday. Monday, Tuesday, Wednesday. Again:"
    ref = smol_llm_default.generate([prompt], sp, use_tqdm=False)
    out = ngram_llm.generate([prompt], sp, use_tqdm=False)
    assert tokens(out) == tokens(ref)
    assert out[0].metrics.spec_num_draft_tokens > 0


@pytest.mark.parametrize("draft", ["self", "tiny"])
def test_draft_model_greedy_equals_ordinary_decoding(
    draft: str, smol_llm_default: LLM, default_model_path: str, tiny_model_dirs: dict[str, str]
) -> None:
    """A draft that agrees with the target (the same file) and one that almost never
    does (a random tiny model with the same vocabulary): the output is the target's."""
    path = default_model_path if draft == "self" else tiny_model_dirs["LlamaForCausalLM"]
    llm = LLM(
        max_model_len=1024, kv_cache_memory="256MiB",
        speculative_config={"method": "draft_model", "model": path, "num_speculative_tokens": 3},
    )  # fmt: skip
    sp = SamplingParams(temperature=0, max_tokens=40)
    prompts = [{"prompt": p} for p in PROMPTS]
    ref = smol_llm_default.generate(prompts, sp, use_tqdm=False)
    out = llm.generate(prompts, sp, use_tqdm=False)
    assert tokens(out) == tokens(ref)
    drafts = sum(o.metrics.spec_num_draft_tokens for o in out)
    accepted = sum(o.metrics.spec_num_accepted_tokens for o in out)
    assert drafts > 0
    if draft == "self":
        assert accepted / drafts > 0.9
    else:
        assert accepted / drafts < 0.5
    llm.engine.core.scheduler.check_invariants()


def _meta(n: int, temp: float, **kw: Any) -> SamplingMetadata:
    return SamplingMetadata(temperature=torch.full((n,), temp), all_greedy=temp == 0, **kw)


def test_rejection_sampler_is_exact_chi_square() -> None:
    """Many copies of one request with two proposals: the first token follows row 0's
    distribution, and the second (when the first is the proposal) row 1's, for plain
    temperature sampling and with top-k/top-p/min-p."""
    torch.manual_seed(0)
    vocab, copies = 8, 20000
    base = torch.randn(3, vocab) * 1.5
    drafts = [2, 5]
    logits = base.repeat(copies, 1)
    sampler = Sampler(torch.Generator().manual_seed(1))
    for kw in ({}, {"top_k": 6, "top_p": 0.9, "min_p": 0.05}):
        n = 3 * copies
        meta = _meta(n, 0.8)
        if kw:
            meta.top_k = torch.full((n,), kw["top_k"])
            meta.top_p = torch.full((n,), kw["top_p"])
            meta.min_p = torch.full((n,), kw["min_p"])
        _, toks = sampler.verify(logits.clone(), meta, [list(drafts)] * copies)
        # The exact target distributions of rows 0 and 1.
        ref_meta = _meta(3, 0.8)
        if kw:
            ref_meta.top_k = torch.full((3,), kw["top_k"])
            ref_meta.top_p = torch.full((3,), kw["top_p"])
            ref_meta.min_p = torch.full((3,), kw["min_p"])
        p = sampler._probs(base.clone(), ref_meta)
        p = p / p.sum(dim=-1, keepdim=True)
        first = Counter(t[0] for t in toks)
        support = [v for v in range(vocab) if p[0, v] > 0]
        assert set(first) <= set(support)
        stat = chi2([first[v] for v in support], [copies * float(p[0, v]) for v in support])
        assert stat < chi2_critical(len(support) - 1), (kw, stat)
        follow = [t[1] for t in toks if t[0] == drafts[0]]
        second = Counter(follow)
        support = [v for v in range(vocab) if p[1, v] > 0]
        stat = chi2([second[v] for v in support], [len(follow) * float(p[1, v]) for v in support])
        assert stat < chi2_critical(len(support) - 1), (kw, stat)
        # Both accepted: a third token drawn from the bonus row.
        assert any(len(t) == 3 for t in toks) and any(len(t) == 1 for t in toks)


def test_rejection_sampler_greedy_keeps_matching_proposals() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    sampler = Sampler(torch.Generator().manual_seed(0))
    _, toks = sampler.verify(logits.clone(), _meta(3, 0.0), [[1, 0]])
    assert toks == [[1, 0, 2]]
    _, toks = sampler.verify(logits.clone(), _meta(3, 0.0), [[1, 2]])
    assert toks == [[1, 0]]  # the second proposal differs from the argmax
    _, toks = sampler.verify(logits[:1].clone(), _meta(1, 0.0), [[]])
    assert toks == [[1]]


def test_engine_sampling_distribution_with_a_draft(tiny_model_dirs: dict[str, str]) -> None:
    """Through the whole engine: a tiny random model drafts for itself (greedy point
    masses), requests sample 3 tokens at temperature 1 with top_k=4 (the second and
    third come from one verification step). The joint distribution of the first 2
    tokens matches the model's own (computed with transformers)."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_dirs["LlamaForCausalLM"]
    spec = {"method": "draft_model", "model": path, "num_speculative_tokens": 1,
            "disable_by_batch_size": 100000}  # fmt: skip
    llm = LLM(model=path, dtype="float32", max_model_len=64, kv_cache_memory="64MiB",
              max_num_seqs=256, speculative_config=spec, seed=3)  # fmt: skip
    prompt = [1, 345, 678, 910, 1112]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def top4(ids: list[int]) -> dict[int, float]:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1]
        top = logits.topk(4)
        return dict(zip(top.indices.tolist(), top.values.softmax(-1).tolist()))

    p1 = top4(prompt)
    joint = {(a, b): pa * pb for a, pa in p1.items() for b, pb in top4([*prompt, a]).items()}
    n = 2500
    sp = SamplingParams(temperature=1.0, top_k=4, max_tokens=3, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": prompt}] * n, sp, use_tqdm=False)
    seen = Counter(tuple(o.outputs[0].token_ids[:2]) for o in outs)
    assert set(seen) <= set(joint)
    cells = sorted(joint)
    stat = chi2([seen[c] for c in cells], [n * joint[c] for c in cells])
    assert stat < chi2_critical(len(cells) - 1), (stat, seen)
    drafts = sum(o.metrics.spec_num_draft_tokens for o in outs)
    accepted = sum(o.metrics.spec_num_accepted_tokens for o in outs)
    assert drafts == n and 0 < accepted < drafts  # both paths were taken


def test_bad_speculative_configs_are_refused() -> None:
    from pagellm.engine.arg_utils import EngineArgs

    bad = [
        "{not json",
        {"method": "eagle", "num_speculative_tokens": 2},
        {"method": "ngram"},
        {"method": "ngram", "num_speculative_tokens": 0},
        {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
         "prompt_lookup_max": 2},
        {"method": "ngram", "num_speculative_tokens": 2, "speculative_sauce": 1},
        {"method": "draft_model", "num_speculative_tokens": 2},
    ]  # fmt: skip
    for cfg in bad:
        with pytest.raises(ValueError, match="speculative_config"):
            EngineArgs(speculative_config=cfg).create_engine_config()
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SamplingParams(num_speculative_tokens=-1)


def test_speculation_turns_itself_off_where_measured() -> None:
    """Quantized weights on CPU stop paying above 4 requests, float weights above 8; an
    explicit disable_by_batch_size wins."""
    from pagellm.engine.arg_utils import EngineArgs

    def limit(**kw: Any) -> int:
        spec = EngineArgs(speculative_config=NGRAM, **kw).create_engine_config().speculative
        assert spec is not None
        return spec.disable_by_batch_size

    assert limit() == 4  # the default GGUF, kept quantized
    assert limit(quantization="none") == 8
    cfg = {**NGRAM, "disable_by_batch_size": 3}
    spec = EngineArgs(speculative_config=cfg).create_engine_config().speculative
    assert spec is not None and spec.disable_by_batch_size == 3


def test_server_reports_acceptance_and_takes_the_per_request_switch() -> None:
    import httpx
    import openai
    from prometheus_client.parser import text_string_to_metric_families

    from tests.utils import RemoteServer

    srv = RemoteServer([
        "--max-model-len", "512", "--kv-cache-memory", "128MiB",
        "--speculative-config", json.dumps(NGRAM),
    ])  # fmt: skip
    try:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x")
        msgs = [{"role": "user", "content": EDIT_PROMPT}]
        plain = client.chat.completions.create(
            model=client.models.list().data[0].id, messages=msgs,  # type: ignore[arg-type]
            max_tokens=64, temperature=0, extra_body={"num_speculative_tokens": 0},
        )  # fmt: skip
        http = httpx.Client(base_url=srv.url())

        def metrics() -> dict[str, float]:
            fams = text_string_to_metric_families(http.get("/metrics").text)
            return {s.name: s.value for f in fams for s in f.samples if "spec_decode" in s.name}

        assert metrics().get("pagellm:spec_decode_num_draft_tokens_total", 0) == 0
        chunks = client.chat.completions.create(
            model=plain.model, messages=msgs, max_tokens=64, temperature=0,  # type: ignore[arg-type]
            stream=True,
        )  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content
        m = metrics()
        assert m["pagellm:spec_decode_num_draft_tokens_total"] > 0
        assert m["pagellm:spec_decode_num_accepted_tokens_total"] > 0
        assert 0 < m["pagellm:spec_decode_acceptance_rate"] <= 1
        assert m["pagellm:spec_decode_mean_accepted_length"] > 1
        # bench serve reads the same counters (pagellm's names or vLLM's).
        from argparse import Namespace

        from pagellm.benchmarks.serve import _server_counters

        counters = _server_counters(Namespace(base_url=srv.url().rstrip("/"), api_key=None))
        assert (
            counters["spec_decode_num_draft_tokens_total"]
            == m["pagellm:spec_decode_num_draft_tokens_total"]
        )
        r = http.post("/v1/completions", json={"model": plain.model, "prompt": "hi",
                                               "num_speculative_tokens": -1})  # fmt: skip
        assert r.status_code == 400 and "num_speculative_tokens" in r.json()["error"]["message"]
    finally:
        assert srv.stop() == 0, srv.logs()
    assert "Traceback" not in srv.logs()
