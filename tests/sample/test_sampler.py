"""The sampler on synthetic logits: what each parameter must and must not change."""

from __future__ import annotations

import torch

from pagellm.sample.sampler import (
    Sampler,
    SamplingMetadata,
    apply_top_k_top_p,
    seeded_generator,
)

V = 50


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g) * 2


def meta(n: int, temperature: float = 1.0, **kw: object) -> SamplingMetadata:
    return SamplingMetadata(
        temperature=torch.full((n,), temperature), all_greedy=temperature == 0, **kw
    )  # type: ignore[arg-type]


def draw(logits: torch.Tensor, m: SamplingMetadata, times: int, seed: int = 1) -> torch.Tensor:
    sampler = Sampler(torch.Generator().manual_seed(seed))
    # The sampler consumes its logits: hand it a copy each time.
    return torch.stack([sampler(logits.clone(), m).sampled for _ in range(times)])


def test_greedy_is_argmax() -> None:
    x = logits_rows(4)
    out = Sampler()(x, meta(4, temperature=0.0))
    assert out.sampled.tolist() == x.argmax(-1).tolist()


def test_top_k_restricts_support_to_k_most_likely() -> None:
    x = logits_rows(3)
    k = torch.tensor([1, 3, V])
    samples = draw(x, meta(3, top_k=k), 400)
    for row, kk in enumerate(k.tolist()):
        allowed = set(x[row].topk(kk).indices.tolist())
        seen = set(samples[:, row].tolist())
        assert seen <= allowed
        if kk == 3:
            assert seen == allowed  # all three occur in 400 draws
    assert len(set(samples[:, 2].tolist())) > 10  # k = V: no restriction


def test_top_p_keeps_smallest_nucleus() -> None:
    x = torch.full((2, V), -10.0)
    x[:, :4] = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    top_p = torch.tensor([0.75, 0.81])
    masked = apply_top_k_top_p(x, None, top_p)
    # Row 0: 0.5 + 0.3 >= 0.75 -> two tokens; row 1: needs 0.5+0.3+0.15 -> three.
    assert torch.isfinite(masked[0]).sum().item() == 2
    assert torch.isfinite(masked[1]).sum().item() == 3
    samples = draw(x, meta(2, top_p=top_p), 300)
    assert set(samples[:, 0].tolist()) == {0, 1}
    assert set(samples[:, 1].tolist()) == {0, 1, 2}


def test_min_p_drops_unlikely_tokens() -> None:
    x = torch.full((1, V), -20.0)
    x[0, :3] = torch.log(torch.tensor([0.6, 0.3, 0.05]))
    samples = draw(x, meta(1, min_p=torch.tensor([0.2])), 300)
    assert set(samples[:, 0].tolist()) == {0, 1}  # 0.05 < 0.2 * 0.6


def test_sampling_follows_the_distribution() -> None:
    x = torch.full((1, V), -30.0)
    x[0, :2] = torch.log(torch.tensor([0.8, 0.2]))
    samples = draw(x, meta(1), 2000)
    share = (samples == 0).float().mean().item()
    assert 0.76 < share < 0.84


def test_temperature_sharpens() -> None:
    x = torch.full((1, V), -30.0)
    x[0, :2] = torch.log(torch.tensor([0.6, 0.4]))
    hot = (draw(x, meta(1, temperature=1.0), 1000) == 0).float().mean().item()
    cold = (draw(x, meta(1, temperature=0.2), 1000) == 0).float().mean().item()
    assert cold > 0.8 > hot


def test_seeded_rows_ignore_the_rest_of_the_batch() -> None:
    x = logits_rows(4, seed=3)
    a = Sampler(torch.Generator().manual_seed(1))(
        x.clone(), meta(4, generators={1: seeded_generator(42, 5, torch.device("cpu"))})
    )
    # Same seeded row in a different batch, different position and global seed.
    y = torch.cat([logits_rows(2, seed=9), x[1:2]])
    b = Sampler(torch.Generator().manual_seed(77))(
        y, meta(3, generators={2: seeded_generator(42, 5, torch.device("cpu"))})
    )
    assert a.sampled[1].item() == b.sampled[2].item()
    # A different step of the same seed gives an independent draw stream.
    assert (
        seeded_generator(42, 5, torch.device("cpu")).initial_seed()
        != seeded_generator(42, 6, torch.device("cpu")).initial_seed()
    )


def test_penalties_change_what_they_should() -> None:
    x = torch.zeros(1, V)
    x[0, 10] = 2.0
    x[0, 11] = -2.0
    m = meta(
        1,
        temperature=0.0,
        presence_penalty=torch.tensor([0.5]),
        frequency_penalty=torch.tensor([0.25]),
        repetition_penalty=torch.tensor([2.0]),
        prompt_token_ids=[[11]],
        output_token_ids=[[10, 10, 12]],
    )
    from pagellm.sample.sampler import apply_penalties

    out = apply_penalties(x.clone(), m)
    # token 10: seen -> 2/2 = 1, then -0.25*2 (frequency) -0.5 (presence) = 0
    assert abs(out[0, 10].item() - 0.0) < 1e-6
    # token 11: in the prompt only -> -2 * 2 = -4, no frequency/presence (output only)
    assert abs(out[0, 11].item() + 4.0) < 1e-6
    # token 12: 0 * 2 = 0, then -0.25 - 0.5
    assert abs(out[0, 12].item() + 0.75) < 1e-6
    # untouched token
    assert out[0, 0].item() == 0.0
    # greedy now picks something other than the penalised favourite
    assert Sampler()(x, m).sampled.item() != 10


def test_logit_bias_and_min_tokens_masks() -> None:
    x = torch.zeros(2, V)
    x[:, 5] = 1.0
    m = meta(2, temperature=0.0, logit_bias=[{7: 5.0}, None], min_tokens_blocked=[(1, [5])])
    out = Sampler()(x, m).sampled.tolist()
    assert out[0] == 7  # bias wins
    assert out[1] != 5  # blocked until min_tokens


def test_logprobs_are_raw_log_softmax_with_ranks() -> None:
    x = logits_rows(3, seed=5)
    out = Sampler(torch.Generator().manual_seed(0))(
        x.clone(), meta(3, max_num_logprobs=4, temperature=0.7)
    )
    ref = x.log_softmax(-1)
    assert out.logprobs is not None and out.logprob_token_ids is not None
    assert out.sampled_ranks is not None
    for r in range(3):
        tok = out.sampled[r].item()
        assert out.logprob_token_ids[r, 0].item() == tok
        assert abs(out.logprobs[r, 0].item() - ref[r, tok].item()) < 1e-6
        top = ref[r].topk(4)
        assert out.logprob_token_ids[r, 1:].tolist() == top.indices.tolist()
        assert torch.allclose(out.logprobs[r, 1:], top.values)
        assert out.sampled_ranks[r].item() == int((ref[r] > ref[r, tok]).sum()) + 1
