"""OutputProcessor: token deltas from the core -> text, stop strings, RequestOutputs.

Per request it keeps an incremental detokenizer, the text so far and the logprobs.
Stop strings are searched in the text (so a stop string split over several tokens is
found); a match truncates the text and finishes the request, which the engine then
aborts in the scheduler. While a request with stop strings streams, the last
``len(longest stop) - 1`` characters are held back so a client never sees the start of
a stop string that is about to be cut.

A request with n > 1 is n child requests under one ParentRequest that assembles their
CompletionOutputs into one RequestOutput.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pagellm.core.request import Request
from pagellm.core.sched_output import BeamResult, EngineCoreOutput, TokenLogprobs
from pagellm.metrics.stats import FinishedRequestStats, IterationStats
from pagellm.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
    SampleLogprobs,
)
from pagellm.sampling_params import RequestOutputKind, SamplingParams


class IncrementalDetokenizer:
    """Text of a growing token list, decoded one token at a time."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        backend = getattr(tokenizer, "_tokenizer", None)
        self._fast = backend
        self._stream: Any = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            try:
                # The prompt's tail gives the decoder its context (leading spaces).
                self._stream = DecodeStream(
                    ids=list(prompt_ids[-6:]), skip_special_tokens=skip_special_tokens
                )
            except TypeError:  # older tokenizers without prefill
                self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._text = ""

    def add(self, token_id: int) -> str:
        """Append a token; return the text it completes (may be empty mid-character)."""
        if self._stream is not None:
            piece = self._stream.step(self._fast, token_id)
            return piece or ""
        self._ids.append(token_id)
        text = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special)
        if text.endswith("\ufffd"):
            return ""
        new, self._text = text[len(self._text) :], text
        return new


@dataclass
class RequestState:
    req_id: str
    parent: ParentRequest | None
    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    metrics: RequestMetrics
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: SampleLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    sent_text: int = 0  # characters already handed out (DELTA)
    sent_tokens: int = 0
    sent_logprobs: int = 0
    sent_prompt_logprobs: bool = False
    beam_results: list[BeamResult] | None = None
    embedding: list[float] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ParentRequest:
    """Joins the samples of a request (n > 1, best_of) into one RequestOutput."""

    req_id: str
    n: int
    """Samples generated."""
    kind: RequestOutputKind
    num_return: int
    """Completions returned: n, or with best_of the n of highest cumulative logprob."""
    children: dict[int, RequestState] = field(default_factory=dict)

    @classmethod
    def for_params(cls, req_id: str, params: SamplingParams) -> ParentRequest | None:
        samples = params.num_samples
        if samples == 1:
            return None
        return cls(req_id, samples, params.output_kind, params.n)

    def finished(self) -> bool:
        return len(self.children) == self.n and all(c.finished for c in self.children.values())

    def chosen(self) -> list[RequestState]:
        """The children to report, in index order (best_of: the best by cumulative logprob)."""
        kids = [self.children[i] for i in sorted(self.children)]
        if self.num_return == self.n or not self.finished():
            return kids
        best = sorted(kids, key=lambda c: -(c.cumulative_logprob or 0.0))[: self.num_return]
        return best


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self._token_text: dict[int, str] = {}

    def add_request(
        self,
        request: Request,
        prompt: str | None,
        parent: ParentRequest | None = None,
        index: int = 0,
    ) -> None:
        params = request.sampling_params
        state = RequestState(
            req_id=request.req_id,
            parent=parent,
            index=index,
            prompt=prompt,
            prompt_token_ids=request.prompt_token_ids,
            params=params,
            detokenizer=(
                IncrementalDetokenizer(
                    self.tokenizer, request.prompt_token_ids, params.skip_special_tokens
                )
                if params.detokenize
                else None
            ),
            metrics=RequestMetrics(arrival_time=request.arrival_time),
            logprobs=[] if params.logprobs is not None else None,
            cumulative_logprob=0.0 if params.logprobs is not None else None,
        )
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        self.states[request.req_id] = state
        if parent is not None:
            parent.children[index] = state

    def has_unfinished(self) -> bool:
        return bool(self.states)

    def abort_requests(
        self, req_ids: list[str], stats: IterationStats | None = None
    ) -> list[RequestOutput]:
        """Mark requests aborted and return their final outputs."""
        outs = []
        now = time.time()
        for req_id in req_ids:
            state = self.states.get(req_id)
            if state is None or state.finished:
                continue
            state.finish_reason = "abort"
            state.metrics.finished_time = now
            if stats is not None:
                stats.finished.append(_finished_stats(state, now))
            out = self._make_output(state)
            self.states.pop(req_id, None)
            if out is not None:
                outs.append(out)
        return outs

    def _token_str(self, token_id: int) -> str:
        s = self._token_text.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id])
            self._token_text[token_id] = s
        return s

    def _to_logprob_dict(self, lp: TokenLogprobs) -> dict[int, Logprob]:
        out: dict[int, Logprob] = {}
        for tok, val, rank in zip(lp.token_ids, lp.logprobs, lp.ranks):
            if tok not in out:
                out[tok] = Logprob(val, rank, self._token_str(tok))
        return out

    def process_outputs(
        self,
        core_outputs: list[EngineCoreOutput],
        now: float | None = None,
        stats: IterationStats | None = None,
    ) -> tuple[list[RequestOutput], list[str]]:
        """(RequestOutputs to hand out, request ids the core must abort for stop strings).

        With ``stats``, also records first-token and inter-token times and finished
        requests for the metrics."""
        now = time.time() if now is None else now
        results: list[RequestOutput] = []
        to_abort: list[str] = []
        for co in core_outputs:
            state = self.states.get(co.req_id)
            if state is None:
                continue
            m = state.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = co.first_scheduled_time
            state.num_cached_tokens = co.num_cached_tokens
            if co.spec_num_draft_tokens:
                m.spec_num_drafts += 1
                m.spec_num_draft_tokens += co.spec_num_draft_tokens
                m.spec_num_accepted_tokens += co.spec_num_accepted_tokens
            if co.new_prompt_logprobs and state.prompt_logprobs is not None:
                state.prompt_logprobs.extend(
                    self._to_logprob_dict(lp) for lp in co.new_prompt_logprobs
                )
            if co.new_token_ids:
                if stats is not None:
                    stats.num_generation_tokens += len(co.new_token_ids)
                    if m.first_token_time is None:
                        stats.time_to_first_tokens.append(now - m.arrival_time)
                        stats.num_prompt_tokens += len(state.prompt_token_ids)
                    elif m.last_token_time is not None:
                        stats.inter_token_latencies.append(now - m.last_token_time)
                if m.first_token_time is None:
                    m.first_token_time = now
                m.last_token_time = now
                m.num_generation_tokens += len(co.new_token_ids)
            if co.new_logprobs and state.logprobs is not None:
                for lp in co.new_logprobs:
                    state.logprobs.append(self._to_logprob_dict(lp))
                    if state.cumulative_logprob is not None:
                        state.cumulative_logprob += lp.logprobs[0]
            if co.pooled is not None:
                state.embedding = co.pooled
            if co.beam_results is not None:
                # A beam search reports once, at the end, with every returned sequence.
                state.beam_results = co.beam_results
                m.first_token_time = m.first_token_time or now
                m.last_token_time = now
                m.num_generation_tokens = sum(len(r.token_ids) for r in co.beam_results)
            stopped_by_string = self._append_tokens(state, co.new_token_ids)
            if co.finish_reason is not None and not state.finished:
                state.finish_reason = co.finish_reason
                state.stop_reason = co.stop_reason
            if stopped_by_string and not co.finished:
                to_abort.append(co.req_id)
            if state.finished:
                m.finished_time = now
                if stats is not None:
                    stats.finished.append(_finished_stats(state, now))
            out = self._make_output(state)
            if state.finished:
                self.states.pop(co.req_id, None)
            if out is not None:
                results.append(out)
        return results, to_abort

    def _append_tokens(self, state: RequestState, token_ids: list[int]) -> bool:
        """Add tokens and their text; True if a stop string ended the request."""
        params = state.params
        for tok in token_ids:
            state.token_ids.append(tok)
            if state.detokenizer is None:
                continue
            prev_len = len(state.text)
            state.text += state.detokenizer.add(tok)
            if (
                params.stop
                and len(state.text) > prev_len
                and self._check_stop_strings(state, prev_len)
            ):
                # Tokens after the one that completed the stop string are dropped.
                return True
        return False

    def _check_stop_strings(self, state: RequestState, prev_len: int) -> bool:
        params = state.params
        assert isinstance(params.stop, list)
        longest = max(len(s) for s in params.stop)
        search_from = max(0, prev_len - longest + 1)
        best: tuple[int, str] | None = None
        for stop in params.stop:
            idx = state.text.find(stop, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return False
        idx, stop = best
        state.text = (
            state.text[: idx + len(stop)] if params.include_stop_str_in_output else state.text[:idx]
        )
        state.finish_reason = "stop"
        state.stop_reason = stop
        return True

    def _beam_completions(self, state: RequestState) -> list[CompletionOutput]:
        assert state.beam_results is not None
        return [
            CompletionOutput(
                index=i,
                text=self.tokenizer.decode(
                    r.token_ids, skip_special_tokens=state.params.skip_special_tokens
                ),
                token_ids=list(r.token_ids),
                cumulative_logprob=r.cumulative_logprob,
                finish_reason=r.finish_reason,
            )
            for i, r in enumerate(state.beam_results)
        ]

    def _completion(self, state: RequestState, delta: bool) -> CompletionOutput:
        params = state.params
        text_end = len(state.text)
        if not state.finished and params.stop and not params.include_stop_str_in_output:
            assert isinstance(params.stop, list)
            text_end = max(state.sent_text, text_end - (max(len(s) for s in params.stop) - 1))
        if delta:
            text = state.text[state.sent_text : text_end]
            token_ids = state.token_ids[state.sent_tokens :]
            logprobs = state.logprobs[state.sent_logprobs :] if state.logprobs is not None else None
            state.sent_text = text_end
            state.sent_tokens = len(state.token_ids)
            state.sent_logprobs = len(state.logprobs) if state.logprobs is not None else 0
        else:
            text = state.text[:text_end]
            token_ids = list(state.token_ids)
            logprobs = list(state.logprobs) if state.logprobs is not None else None
        return CompletionOutput(
            index=state.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=state.cumulative_logprob,
            logprobs=logprobs if params._report_logprobs else None,
            finish_reason=state.finish_reason,
            stop_reason=state.stop_reason,
        )

    def _make_output(self, state: RequestState) -> RequestOutput | None:
        kind = state.params.output_kind
        parent = state.parent
        if parent is None:
            if kind == RequestOutputKind.FINAL_ONLY and not state.finished:
                return None
            if state.beam_results is not None:
                return self._request_output(
                    state.req_id, state, self._beam_completions(state), True
                )
            return self._request_output(
                state.req_id,
                state,
                [self._completion(state, kind == RequestOutputKind.DELTA)],
                state.finished,
            )
        # A child of an n > 1 request.
        if kind == RequestOutputKind.DELTA:
            return self._request_output(
                parent.req_id, state, [self._completion(state, True)], parent.finished()
            )
        if kind == RequestOutputKind.FINAL_ONLY and not parent.finished():
            return None
        comps = [self._completion(child, False) for child in parent.chosen()]
        if parent.num_return != parent.n and parent.finished():
            for i, comp in enumerate(comps):
                comp.index = i  # best_of: the chosen ones, renumbered
        return self._request_output(parent.req_id, state, comps, parent.finished())

    def _request_output(
        self, req_id: str, state: RequestState, comps: list[CompletionOutput], finished: bool
    ) -> RequestOutput:
        prompt_logprobs = None
        if state.prompt_logprobs is not None and (
            state.params.output_kind != RequestOutputKind.DELTA or not state.sent_prompt_logprobs
        ):
            prompt_logprobs = state.prompt_logprobs
            state.sent_prompt_logprobs = True
        metrics = state.metrics
        if state.parent is not None:
            # The parent's metrics span its children: first arrival, first token, last finish.
            kids = list(state.parent.children.values())
            metrics = RequestMetrics(
                arrival_time=min(k.metrics.arrival_time for k in kids),
                first_scheduled_time=_min_opt(k.metrics.first_scheduled_time for k in kids),
                first_token_time=_min_opt(k.metrics.first_token_time for k in kids),
                last_token_time=_max_opt(k.metrics.last_token_time for k in kids),
                finished_time=_max_opt(k.metrics.finished_time for k in kids) if finished else None,
                num_generation_tokens=sum(k.metrics.num_generation_tokens for k in kids),
                spec_num_drafts=sum(k.metrics.spec_num_drafts for k in kids),
                spec_num_draft_tokens=sum(k.metrics.spec_num_draft_tokens for k in kids),
                spec_num_accepted_tokens=sum(k.metrics.spec_num_accepted_tokens for k in kids),
            )
        return RequestOutput(
            request_id=req_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=comps,
            finished=finished,
            prompt_logprobs=prompt_logprobs,
            metrics=metrics,
            num_cached_tokens=state.num_cached_tokens,
            embedding=state.embedding,
        )


def _finished_stats(state: RequestState, now: float) -> FinishedRequestStats:
    m = state.metrics
    scheduled = m.first_scheduled_time if m.first_scheduled_time is not None else now
    first = m.first_token_time if m.first_token_time is not None else now
    last = m.last_token_time if m.last_token_time is not None else first
    return FinishedRequestStats(
        finish_reason=state.finish_reason or "abort",
        e2e_latency=now - m.arrival_time,
        queue_time=scheduled - m.arrival_time,
        prefill_time=first - scheduled,
        decode_time=last - first,
        num_prompt_tokens=len(state.prompt_token_ids),
        num_generation_tokens=len(state.token_ids),
    )


def _min_opt(values: Any) -> float | None:
    vals = [v for v in values if v is not None]
    return min(vals) if vals else None


def _max_opt(values: Any) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None
