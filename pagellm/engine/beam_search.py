"""Beam search on top of forkable KV: beams are requests, a step's winners are forks.

Each live beam computes one position and reports the top-K log-probabilities of its
next token (K = max(2, 1 + #EOS ids) * width, as transformers keeps). The group then
does what transformers' ``generate(num_beams=...)`` does, in the same fp32 arithmetic,
so outputs match it token for token:

1. accumulate: candidate score = beam score + logprob; keep the best K overall;
2. a candidate that ends (EOS, or the length limit) and ranks among the first ``width``
   becomes a finished hypothesis scored ``score / generated_len ** length_penalty``; the
   best ``width`` hypotheses are kept;
3. the best ``width`` candidates that did not end are the next beams;
4. stop when every candidate ends, when ``early_stopping`` is True and ``width``
   hypotheses are done, or when (with all hypotheses done) no running beam can still
   beat the worst of them.

Turning the winners into requests: a beam picked k times continues itself once and is
forked k - 1 times (children share every KV block, the partial last one included, and
copy it on first write); a beam picked zero times is aborted and frees its blocks at
once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from pagellm.core.request import Request, RequestStatus
from pagellm.core.sched_output import BeamResult, EngineCoreOutput, TokenLogprobs
from pagellm.core.scheduler import Scheduler


def candidates_per_beam(width: int, num_eos: int) -> int:
    return max(2, 1 + num_eos) * width


@dataclass
class _Hypothesis:
    token_ids: list[int]
    score: torch.Tensor  # fp32 scalar, length-normalised
    raw: float


@dataclass
class BeamSearchGroup:
    root_id: str
    width: int
    num_return: int
    length_penalty: float
    early_stopping: bool | str
    max_new_tokens: int
    eos_ids: frozenset[int]
    # Live beams, best first: req_id -> fp32 running score.
    beams: dict[str, torch.Tensor] = field(default_factory=dict)
    pending: dict[str, TokenLogprobs] = field(default_factory=dict)
    finished: list[_Hypothesis] = field(default_factory=list)
    improvable: bool = True
    num_generated: int = 0
    _ids: itertools.count = field(default_factory=itertools.count)

    @classmethod
    def start(cls, root: Request) -> BeamSearchGroup:
        p = root.sampling_params
        assert p.beam_width is not None
        eos = (
            frozenset()
            if p.ignore_eos
            else frozenset(root.eos_token_ids) | frozenset(p.stop_token_ids or ())
        )
        group = cls(
            root_id=root.req_id,
            width=p.beam_width,
            num_return=p.n,
            length_penalty=float(p.length_penalty),
            early_stopping=p.early_stopping,
            max_new_tokens=root.max_tokens,
            eos_ids=eos,
        )
        group.beams[root.req_id] = torch.zeros((), dtype=torch.float32)
        return group

    @property
    def num_candidates(self) -> int:
        return candidates_per_beam(self.width, len(self.eos_ids))

    def ready(self) -> bool:
        return bool(self.beams) and self.pending.keys() >= self.beams.keys()

    def advance(self, scheduler: Scheduler) -> EngineCoreOutput | None:
        """One beam step from the reported logprobs; returns the final output when done."""
        beam_ids = list(self.beams)
        flat_scores: list[torch.Tensor] = []
        origin: list[tuple[str, int]] = []
        for b in beam_ids:
            lp = self.pending[b]
            # Entry 0 is the (ignored) sampled token; the top-K follow in rank order.
            tokens, values = lp.token_ids[1:], lp.logprobs[1:]
            flat_scores.append(self.beams[b] + torch.tensor(values, dtype=torch.float32))
            origin.extend((b, t) for t in tokens)
        self.pending.clear()
        scores = torch.cat(flat_scores)
        k = min(self.num_candidates, scores.numel())
        top_scores, top_idx = torch.topk(scores, k)
        cands = [(origin[i], top_scores[j]) for j, i in enumerate(top_idx.tolist())]
        gen_len = self.num_generated + 1
        at_limit = gen_len >= self.max_new_tokens
        hits = [at_limit or tok in self.eos_ids for (_, tok), _ in cands]

        requests = scheduler.requests
        all_full = len(self.finished) == self.width and self.early_stopping is True
        if self.improvable and not all_full:
            norm = top_scores / (gen_len**self.length_penalty)
            for rank, (((b, tok), raw), hit) in enumerate(zip(cands, hits)):
                if hit and rank < self.width:
                    tokens = [*requests[b].output_token_ids, tok]
                    self.finished.append(_Hypothesis(tokens, norm[rank], float(raw)))
            # Stable: among equal scores the older hypothesis stays first.
            self.finished.sort(key=lambda h: -float(h.score))
            del self.finished[self.width :]

        winners = [(b, tok, score) for ((b, tok), score), hit in zip(cands, hits) if not hit][
            : self.width
        ]
        self.num_generated = gen_len
        if winners:
            if self.early_stopping == "never" and self.length_penalty > 0.0:
                best_len = self.max_new_tokens
            else:
                best_len = gen_len
            best_possible = winners[0][2] / (best_len**self.length_penalty)
            if len(self.finished) == self.width:
                worst = min(h.score for h in self.finished)
                self.improvable = self.improvable and bool(best_possible > worst)
        all_full = len(self.finished) == self.width and self.early_stopping is True
        done = not winners or not self.improvable or all_full
        if done:
            return self._finish(scheduler)
        self._continue(scheduler, winners)
        return None

    def _continue(self, scheduler: Scheduler, winners: list[tuple[str, int, torch.Tensor]]) -> None:
        used: dict[str, int] = {}
        plan: list[tuple[str, str, int, torch.Tensor]] = []  # (beam request, parent, token, score)
        for parent, tok, score in winners:
            if parent not in used:
                used[parent] = 1
                plan.append((parent, parent, tok, score))
            else:
                child = scheduler.requests[parent].fork(f"{self.root_id}#beam{next(self._ids)}")
                scheduler.fork_request(parent, child)  # before the parent gets its new token
                plan.append((child.req_id, parent, tok, score))
        dropped = [b for b in self.beams if b not in used]
        scheduler.finish_requests(dropped, RequestStatus.FINISHED_ABORTED)
        self.beams = {}
        for req_id, _, tok, score in plan:
            scheduler.append_token(req_id, tok)
            self.beams[req_id] = score

    def _finish(self, scheduler: Scheduler) -> EngineCoreOutput:
        scheduler.finish_requests(list(self.beams), RequestStatus.FINISHED_ABORTED)
        self.beams = {}
        results = [
            BeamResult(
                token_ids=h.token_ids,
                cumulative_logprob=h.raw,
                score=float(h.score),
                finish_reason="stop"
                if h.token_ids and h.token_ids[-1] in self.eos_ids
                else "length",
            )
            for h in self.finished[: self.num_return]
        ]
        return EngineCoreOutput(
            req_id=self.root_id,
            new_token_ids=[],
            finish_reason=results[0].finish_reason if results else "length",
            beam_results=results,
        )

    def abort(self, scheduler: Scheduler) -> None:
        scheduler.finish_requests(list(self.beams), RequestStatus.FINISHED_ABORTED)
        self.beams = {}
