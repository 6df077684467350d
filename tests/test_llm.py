"""The offline LLM API on the real model: sampling parameters, stop conditions,
reproducibility, logprobs and bad input."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pagellm import LLM, SamplingParams
from tests.conftest import KV_BYTES_PER_TOKEN

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def greedy_tokens(llm: Any, prompt: str, n: int = 24) -> list[int]:
    out = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False
    )
    return list(out[0].outputs[0].token_ids)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=-2), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_p=2.0), "min_p"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(n=0), "n"),
        (dict(logprobs=100), "logprobs"),
        (dict(stop=[""]), "stop"),
        (dict(temprature=0.5), "temprature"),
    ],
)
def test_bad_sampling_params_name_the_parameter(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_prompts(smol_llm: Any) -> None:
    with pytest.raises(ValueError, match="empty"):
        smol_llm.generate("", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        smol_llm.generate([[]], GREEDY, use_tqdm=False)
    long_prompt = [100] * 3000
    with pytest.raises(ValueError, match=r"3000 tokens.*max_model_len is 2048"):
        smol_llm.generate([long_prompt], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="out of range"):
        smol_llm.generate([[5, 10**7]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        smol_llm.generate(["hi"], [GREEDY, GREEDY], use_tqdm=False)
    # A bad prompt in a batch leaves nothing behind: the engine is idle again.
    with pytest.raises(ValueError):
        smol_llm.generate(["fine", ""], GREEDY, use_tqdm=False)
    assert not smol_llm.engine.has_unfinished_requests()
    # ...and still works.
    assert len(smol_llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 24


def test_unknown_engine_argument() -> None:
    with pytest.raises(ValueError, match="max_num_seq"):
        LLM(max_num_seq=4)


def test_token_id_prompts_equal_text_prompts(smol_llm: Any) -> None:
    tok = smol_llm.get_tokenizer()
    ids = tok.encode("The quick brown fox")
    a = smol_llm.generate("The quick brown fox", GREEDY, use_tqdm=False)[0]
    b = smol_llm.generate([ids], GREEDY, use_tqdm=False)[0]
    c = smol_llm.generate(ids, GREEDY, use_tqdm=False)[0]  # a flat id list is one prompt
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
    assert b.prompt is None and b.prompt_token_ids == ids


def test_seeded_request_is_batch_independent(smol_llm: Any) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = (
        smol_llm.generate("Tell me a story about", seeded, use_tqdm=False)[0].outputs[0].token_ids
    )
    others = [SamplingParams(temperature=0.8, max_tokens=m, ignore_eos=True) for m in (5, 30, 12)]
    outs = smol_llm.generate(
        ["Hi", "Tell me a story about", "Numbers: 1 2 3", "A B C"],
        [others[0], seeded, others[1], others[2]],
        use_tqdm=False,
    )
    assert outs[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=20, ignore_eos=True)
    different = smol_llm.generate("Tell me a story about", other_seed, use_tqdm=False)[0]
    assert different.outputs[0].token_ids != alone


def test_seeded_request_survives_preemption() -> None:
    # KV for ~400 tokens: six requests of up to 40 + 60 tokens must preempt each other.
    llm = LLM(
        max_model_len=128,
        kv_cache_memory=KV_BYTES_PER_TOKEN * 400,
        block_size=16,
        max_num_seqs=8,
        dtype="float32",
    )
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=60, ignore_eos=True)
    alone = llm.generate("Once upon a time", seeded, use_tqdm=False)[0].outputs[0].token_ids
    prompts = ["Once upon a time"] + [f"Story number {i}: there was a" for i in range(5)]
    outs = llm.generate(prompts, seeded, use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert outs[0].outputs[0].token_ids == alone
    assert all(len(o.outputs[0].token_ids) == 60 for o in outs)


def test_stop_string_across_token_boundary(smol_llm: Any) -> None:
    prompt = "The capital of France is"
    base = smol_llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0]
    tok = smol_llm.get_tokenizer()
    pieces = [tok.decode([t]) for t in base.token_ids]
    # A stop string made of the end of one token and the start of the next.
    i = next(i for i in range(3, len(pieces) - 1) if pieces[i].strip() and pieces[i + 1].strip())
    stop = pieces[i][-2:] + pieces[i + 1][:1]
    full = base.text
    out = smol_llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=24, stop=[stop]), use_tqdm=False
    )
    comp = out[0].outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    assert comp.text == full[: full.index(stop)]
    kept = smol_llm.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=24, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text == full[: full.index(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(smol_llm: Any) -> None:
    base = greedy_tokens(smol_llm, "Count: one, two, three,")
    stop_id = base[3]
    out = smol_llm.generate(
        "Count: one, two, three,",
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id]),
        use_tqdm=False,
    )[0].outputs[0]
    first = base.index(stop_id)
    assert out.token_ids == base[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    chat = [{"role": "user", "content": "Say hi."}]
    short = smol_llm.chat(chat, SamplingParams(temperature=0, max_tokens=100), use_tqdm=False)[0]
    n_short = len(short.outputs[0].token_ids)
    longer = smol_llm.chat(
        chat, SamplingParams(temperature=0, max_tokens=100, min_tokens=n_short + 10), use_tqdm=False
    )[0]
    assert len(longer.outputs[0].token_ids) >= n_short + 10
    assert 2 not in longer.outputs[0].token_ids[: n_short + 9]


def test_penalties_and_logit_bias_on_the_real_model(smol_llm: Any) -> None:
    prompt = "1, 2, 1, 2, 1, 2, 1, 2,"
    base = greedy_tokens(smol_llm, prompt, 16)
    rep = (
        smol_llm.generate(
            prompt,
            SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, frequency_penalty=1.5),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .token_ids
    )
    most = max(set(base), key=base.count)
    assert rep.count(most) < base.count(most)
    forced = (
        smol_llm.generate(
            prompt,
            SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={42: 100}),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .token_ids
    )
    assert forced == [42] * 5


def test_logprobs_equal_reference_log_softmax(smol_llm: Any, hf_smol: Any) -> None:
    prompt = "The three primary colors are"
    out = smol_llm.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2),
        use_tqdm=False,
    )[0]
    ids = out.prompt_token_ids + list(out.outputs[0].token_ids)
    with torch.no_grad():
        ref = hf_smol(torch.tensor([ids])).logits[0].log_softmax(-1)
    n = len(out.prompt_token_ids)
    lps = out.outputs[0].logprobs
    assert lps is not None and len(lps) == 6
    cumulative = 0.0
    for i, lp in enumerate(lps):
        row = ref[n - 1 + i]
        chosen = out.outputs[0].token_ids[i]
        assert lp[chosen].rank == 1  # greedy
        cumulative += lp[chosen].logprob
        assert set(lp) == {chosen, *row.topk(3).indices.tolist()}
        for t, v in lp.items():
            assert abs(v.logprob - row[t].item()) < 1e-3
            assert v.decoded_token == smol_llm.get_tokenizer().decode([t])
    assert out.outputs[0].cumulative_logprob == pytest.approx(cumulative)
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    for pos in range(1, n):
        entry = out.prompt_logprobs[pos]
        assert entry is not None
        t = out.prompt_token_ids[pos]
        assert abs(entry[t].logprob - ref[pos - 1, t].item()) < 1e-3


def test_n_independent_samples(smol_llm: Any) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    a = smol_llm.generate("Write a word:", params, use_tqdm=False)[0]
    b = smol_llm.generate("Write a word:", params, use_tqdm=False)[0]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_chat_applies_template(smol_llm: Any) -> None:
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "system", "content": "You answer in French."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        ],
    ]
    outs = smol_llm.chat(
        conversations, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False
    )
    assert len(outs) == 2
    tok = smol_llm.get_tokenizer()
    expected = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert outs[0].prompt == expected
    assert outs[0].prompt_token_ids == tok.encode(expected, add_special_tokens=False)
    assert "4" in outs[0].outputs[0].text
