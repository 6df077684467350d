"""Batched sampling with each request's own parameters.

Order of operations on the logits of one step (one row per sampled request):

1. raw log-probabilities (what ``logprobs`` reports: the model's own distribution);
2. min_tokens: EOS / stop ids of rows below their minimum get -inf;
3. logit_bias; repetition, frequency and presence penalties;
4. greedy rows take the argmax; the other rows divide by temperature, apply top-k,
   top-p and min-p, and draw by inverse CDF with one uniform number per row. A seeded
   row draws its number from a generator seeded by (seed, number of tokens generated
   so far), so its tokens depend neither on what else is batched nor on preemption.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_MASK = float("-inf")


def seeded_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator whose state depends only on (seed, step)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 0x9E3779B1 + step * 0x85EBCA77 + 0x165667B1) % (1 << 63))
    return g


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [N], 0 for greedy rows
    all_greedy: bool
    top_k: torch.Tensor | None = None  # [N] int64, vocab size where off
    top_p: torch.Tensor | None = None  # [N]
    min_p: torch.Tensor | None = None  # [N]
    presence_penalty: torch.Tensor | None = None  # [N]; None: no row has any penalty
    frequency_penalty: torch.Tensor | None = None
    repetition_penalty: torch.Tensor | None = None
    prompt_token_ids: list[list[int]] = field(default_factory=list)
    output_token_ids: list[list[int]] = field(default_factory=list)
    logit_bias: list[dict[int, float] | None] | None = None
    min_tokens_blocked: list[tuple[int, list[int]]] = field(default_factory=list)
    """(row, token ids) that may not be sampled yet (min_tokens)."""
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    max_num_logprobs: int | None = None
    """Largest top-N asked for in this batch; None when no row wants logprobs."""
    token_bitmask: torch.Tensor | None = None
    """[n, ceil(vocab / 32)] int32 from the structured-output matchers: bit t % 32 of word
    t // 32 set = token t allowed; None when no row is constrained."""
    bitmask_rows: torch.Tensor | None = None
    """[n] the rows (of this batch) the bitmask's rows belong to."""

    @property
    def no_penalties(self) -> bool:
        return self.presence_penalty is None


@dataclass
class SamplerOutput:
    sampled: torch.Tensor  # [N] int64
    logprob_token_ids: torch.Tensor | None = None  # [N, 1 + k]: sampled token, then top-k
    logprobs: torch.Tensor | None = None  # [N, 1 + k]
    sampled_ranks: torch.Tensor | None = None  # [N] 1-based rank of the sampled token


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[N, vocab] occurrence counts (float32)."""
    n = len(token_lists)
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(n, vocab + 1, dtype=torch.float32, device=device)
    if width:
        padded = torch.full((n, width), vocab, dtype=torch.long)
        for i, toks in enumerate(token_lists):
            if toks:
                padded[i, : len(toks)] = torch.as_tensor(toks, dtype=torch.long)
        padded = padded.to(device)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab]


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: -inf for every token a constrained row may not sample (also past the
    bitmask's end, for vocabularies padded beyond the tokenizer's)."""
    n, vocab = rows.numel(), logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [n, words, 32]
    allowed = bits.reshape(n, -1).bool()
    if allowed.shape[1] < vocab:
        pad = torch.zeros(n, vocab - allowed.shape[1], dtype=torch.bool, device=allowed.device)
        allowed = torch.cat([allowed, pad], dim=1)
    sub = logits.index_select(0, rows).masked_fill_(~allowed[:, :vocab], _MASK)
    logits.index_copy_(0, rows, sub)


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    assert meta.presence_penalty is not None
    assert meta.frequency_penalty is not None and meta.repetition_penalty is not None
    vocab = logits.shape[1]
    out_counts = _token_counts(meta.output_token_ids, vocab, logits.device)
    seen = (_token_counts(meta.prompt_token_ids, vocab, logits.device) > 0) | (out_counts > 0)
    rep = meta.repetition_penalty[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - meta.frequency_penalty[:, None] * out_counts
    logits = logits - meta.presence_penalty[:, None] * (out_counts > 0).float()
    return logits


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask tokens outside each row's top-k and top-p nucleus (at least one survives)."""
    if top_p is None:
        assert top_k is not None
        max_k = int(top_k.max())
        kth = logits.topk(max_k, dim=-1).values.gather(1, (top_k - 1).clamp(min=0)[:, None])
        return logits.masked_fill(logits < kth, _MASK)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        ranks = torch.arange(logits.shape[1], device=logits.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], _MASK)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p.
    drop = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, _MASK)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class Sampler:
    def __init__(self, global_generator: torch.Generator | None = None) -> None:
        self.generator = global_generator

    def _process(
        self, logits: torch.Tensor, meta: SamplingMetadata
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Steps 1-3 (and the grammar's mask): (processed logits, raw log-probabilities
        when logprobs are asked)."""
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if meta.max_num_logprobs is not None else None

        if (
            meta.min_tokens_blocked
            or meta.logit_bias
            or not meta.no_penalties
            or meta.token_bitmask is not None
        ):
            logits = logits.clone()
        for row, ids in meta.min_tokens_blocked:
            logits[row, ids] = _MASK
        if meta.logit_bias:
            for row, bias in enumerate(meta.logit_bias):
                if bias:
                    ids_t = torch.tensor(list(bias.keys()), device=logits.device)
                    vals_t = torch.tensor(list(bias.values()), device=logits.device)
                    logits[row].index_add_(0, ids_t, vals_t)
        if not meta.no_penalties:
            logits = apply_penalties(logits, meta)
        if meta.token_bitmask is not None:
            assert meta.bitmask_rows is not None
            apply_token_bitmask(logits, meta.token_bitmask, meta.bitmask_rows)
        return logits, raw_logprobs

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """Sample one token per row. Takes ownership of ``logits``: its rows may be
        modified in place (no copy of a [batch, vocab] tensor per step)."""
        logits, raw_logprobs = self._process(logits, meta)
        if meta.all_greedy:
            sampled = logits.argmax(dim=-1)
        else:
            greedy_rows = meta.temperature == 0
            # _sample only divides rows by their temperature in place (1 for greedy
            # rows), so the argmax of greedy rows can be taken afterwards.
            sampled = self._sample(logits, meta)
            if bool(greedy_rows.any()):
                sampled = torch.where(greedy_rows, logits.argmax(dim=-1), sampled)

        return self._with_logprobs(SamplerOutput(sampled=sampled), raw_logprobs, meta)

    @staticmethod
    def _with_logprobs(
        out: SamplerOutput, raw_logprobs: torch.Tensor | None, meta: SamplingMetadata
    ) -> SamplerOutput:
        """Add the logprobs of ``out.sampled`` (and the top-N) when they are asked."""
        sampled = out.sampled
        if raw_logprobs is not None:
            assert meta.max_num_logprobs is not None
            chosen = raw_logprobs.gather(1, sampled[:, None])
            ranks = (raw_logprobs > chosen).sum(dim=-1) + 1
            if meta.max_num_logprobs > 0:
                top = raw_logprobs.topk(meta.max_num_logprobs, dim=-1)
                out.logprob_token_ids = torch.cat([sampled[:, None], top.indices], dim=1)
                out.logprobs = torch.cat([chosen, top.values], dim=1)
            else:
                out.logprob_token_ids = sampled[:, None]
                out.logprobs = chosen
            out.sampled_ranks = ranks
        return out

    def verify(
        self,
        logits: torch.Tensor,
        meta: SamplingMetadata,
        drafts: list[list[int]],
        uniforms: torch.Tensor | None = None,
    ) -> tuple[SamplerOutput, list[list[int]]]:
        """Speculative verification (rejection sampling with a deterministic proposer).

        Request i owns ``len(drafts[i]) + 1`` consecutive rows: row j holds the target's
        logits after the request's tokens and drafts[i][:j] (``meta`` describes each row
        accordingly: its penalties' token lists, seed step and grammar mask). A proposal
        d at row j is kept with probability p_j(d) under the row's final distribution
        (temperature, top-k/p, min-p); at the first refusal the token is drawn from p_j
        with d removed and renormalized, and if every proposal is kept a bonus token is
        drawn from the last row. Proposals are point masses (n-gram lookup, a greedy
        draft), so for every token x: P(x) = p(d)[x = d] + (1 - p(d)) p(x) / (1 - p(d))
        [x != d] = p(x): the output is distributed exactly as ordinary sampling's (Leviathan
        et al. 2023, Chen et al. 2023, with q a point mass). Greedy rows are one-hot, so a
        greedy request keeps exactly the proposals equal to its argmax.

        ``uniforms`` [rows, 2] (tests) replaces the random numbers: column 0 for the accept
        test, column 1 for the draw. Returns the rows' chosen tokens (with logprobs when
        asked; rows past a request's refusal hold its last token) and each request's
        tokens: the accepted proposals, then one drawn token.
        """
        logits, raw_logprobs = self._process(logits, meta)
        n, vocab = logits.shape
        if meta.all_greedy:
            probs = torch.zeros_like(logits)
            probs.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        else:
            greedy_rows = meta.temperature == 0
            argmax = logits.argmax(dim=-1)
            probs = self._probs(logits, meta)
            probs = probs / probs.sum(dim=-1, keepdim=True)
            if bool(greedy_rows.any()):
                one_hot = torch.zeros_like(probs).scatter_(1, argmax[:, None], 1.0)
                probs = torch.where(greedy_rows[:, None], one_hot, probs)
        if uniforms is None:
            uniforms = torch.rand(n, 2, device=probs.device, generator=self.generator)
            for row, gen in meta.generators.items():
                uniforms[row] = torch.rand(2, device=probs.device, generator=gen)
        starts = [0]
        for d in drafts:
            starts.append(starts[-1] + len(d) + 1)
        assert starts[-1] == n, (starts[-1], n)
        flat = [t for d in drafts for t in (*d, 0)]
        draft_t = torch.tensor(flat, dtype=torch.long, device=probs.device)
        p_draft = probs.gather(1, draft_t[:, None])[:, 0]
        accept = (uniforms[:, 0].to(p_draft.device) < p_draft).tolist()
        # Each request's first refusal (or its bonus row).
        final_rows: list[int] = []
        for i, d in enumerate(drafts):
            k = 0
            while k < len(d) and accept[starts[i] + k]:
                k += 1
            final_rows.append(starts[i] + k)
        fr = torch.tensor(final_rows, dtype=torch.long, device=probs.device)
        final = probs.index_select(0, fr)
        refused = [i for i, r in enumerate(final_rows) if r - starts[i] < len(drafts[i])]
        if refused:
            idx = torch.tensor(refused, device=probs.device)
            refused_tok = draft_t.index_select(0, fr.index_select(0, idx))
            residual = final.index_select(0, idx).scatter_(1, refused_tok[:, None], 0.0)
            final.index_copy_(0, idx, residual)
        cdf = final.cumsum_(dim=-1)
        target = (uniforms[:, 1].to(cdf.device).index_select(0, fr) * cdf[:, -1])[:, None]
        drawn = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=vocab - 1).tolist()
        tokens: list[list[int]] = []
        chosen = list(flat)
        for i, d in enumerate(drafts):
            k = final_rows[i] - starts[i]
            tokens.append([*d[:k], drawn[i]])
            for r in range(final_rows[i], starts[i + 1]):
                chosen[r] = drawn[i]
        out = SamplerOutput(sampled=torch.tensor(chosen, dtype=torch.long, device=probs.device))
        return self._with_logprobs(out, raw_logprobs, meta), tokens

    def _probs(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Each row's distribution after temperature, top-k, top-p and min-p (min-p's
        cut tokens are zeroed, not renormalized); divides ``logits`` in place."""
        temp = torch.where(
            meta.temperature == 0, torch.ones_like(meta.temperature), meta.temperature
        )
        logits.div_(temp[:, None])
        if meta.top_k is not None or meta.top_p is not None:
            logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
        probs = logits.softmax(dim=-1)
        if meta.min_p is not None:
            floor = probs.max(dim=-1, keepdim=True).values * meta.min_p[:, None]
            probs = probs.masked_fill(probs < floor, 0.0)
        return probs

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Draw one token per row; divides ``logits`` by the temperatures in place."""
        probs = self._probs(logits, meta)
        # Inverse-CDF sampling: one uniform number per row (a seeded row draws its own),
        # the first token whose cumulative probability exceeds it. The fp32 cumulative
        # sum errs by about 1e-7 per token, far below any probability that matters.
        n = probs.shape[0]
        u = torch.rand(n, device=probs.device, generator=self.generator)
        for row, gen in meta.generators.items():
            u[row] = torch.rand(1, device=probs.device, generator=gen)[0]
        cdf = probs.cumsum_(dim=-1)
        target = (u * cdf[:, -1])[:, None]
        return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[1] - 1)
