"""Scheduler: token-budget continuous batching with chunked prefill and preemption.

Each ``schedule()`` fills a budget of ``max_num_batched_tokens`` tokens and
``max_num_seqs`` requests:

1. running requests first, in admission order: each gets the tokens it still lacks
   (one for a decode, the next chunk for an unfinished prefill);
2. if no request had to be preempted, waiting requests in FCFS order: prefix-cache
   lookup, then as much of the prompt as the budget allows.

When the KV pool cannot hold a running request's next tokens, the newest running
request (under ``--scheduling-policy priority``: the least important one) is preempted: its blocks are freed and it goes back to the head of the queue to
be recomputed later (its generated tokens are kept). A request therefore never crashes
the engine for lack of memory and is never lost.

Token ownership: a request's tokens are appended here only (``update_from_output``, or
``append_token`` for beam search); the worker mirrors them from the deltas it is sent.

Speculative decoding: a decoding request with proposals (``Request.spec_token_ids``:
n-gram lookup here, core/ngram_proposer.py; or a draft model's from the worker,
worker/draft_model.py) is scheduled for 1 + s tokens, [last token, d1..ds], counted in
``num_computed_tokens`` like any others. The sampler's rejection test
(``Sampler.verify``) keeps a prefix of the proposals and adds a token of its own, so the
output is distributed exactly as without speculation; ``update_from_output`` takes the
rejected positions back from ``num_computed_tokens`` and frees blocks that held only
them. The prefix cache registers only blocks of the request's own tokens, so unverified
ones never enter it. No step speculates while more than ``disable_by_batch_size``
requests run.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np

from pagellm.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from pagellm.core.kv_cache_manager import KVCacheManager
from pagellm.core.ngram_proposer import propose_ngram
from pagellm.core.request import Request, RequestStatus
from pagellm.core.sched_output import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from pagellm.core.structured_output import StructuredOutputManager

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        structured: StructuredOutputManager | None = None,
        max_loras: int = 0,
        speculative: SpeculativeConfig | None = None,
        kv_group_windows: Sequence[int | None] = (None,),
        num_tier_slots: int = 0,
    ) -> None:
        """``kv_group_windows``: each KV cache group's sliding window (None: full
        attention), as the worker's memory plan laid the groups out."""
        self.config = scheduler_config
        # Speculative decoding (None: off) and its counters since start-up.
        self.spec = speculative
        self.spec_num_drafts = 0  # verification steps that checked at least one token
        self.spec_num_draft_tokens = 0
        self.spec_num_accepted_tokens = 0
        # Most distinct LoRA adapters among running requests (0: LoRA is off).
        self.max_loras = max_loras
        self.block_size = cache_config.block_size
        self.kv = KVCacheManager(
            num_blocks, cache_config.block_size, cache_config.enable_prefix_caching,
            kv_group_windows, cache_config.kv_events, num_tier_slots,
            cache_config.kv_offload_dir is not None,
        )  # fmt: skip
        # A preempted request's blocks: "swap" lets the pool evict them into the second
        # tier (and its resume load them back); "recompute" keeps them out of it.
        self.swap_on_preempt = scheduler_config.preemption_mode == "swap"
        self.num_swapped_in = 0  # preempted requests resumed from the second tier
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Requests the worker still holds state for but which ended since the last step.
        self._finished_ids: set[str] = set()
        # Token ownership: a Request's all_token_ids is the only copy that is ever
        # appended to (by update_from_output, or append_token for beam search). The
        # worker holds a mirror, sent whole once (NewRequestData) and then as deltas:
        # request id -> how many of the request's tokens the worker holds.
        self._worker_known: dict[str, int] = {}
        # Requests whose trailing blocks were freed after a rejection: how many remain
        # (the worker truncates its block table before appending).
        self._trimmed: dict[str, int] = {}
        self.num_preemptions = 0
        # Structured outputs: the grammar matchers (None: the engine has no backend).
        self.structured = structured
        # Requests that ended outside a step (a grammar that did not compile).
        self._failed: list[str] = []

    # ---- requests in and out ----------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request (and the siblings that will fork from it)."""
        for r in (request, *request.pending_forks):
            if r.req_id in self.requests:
                raise ValueError(f"request id {r.req_id!r} is already in use")
        constraint = request.sampling_params.structured_outputs
        if constraint is not None:
            if self.structured is None:
                raise ValueError("this engine has no structured outputs backend")
            self.structured.add(request.req_id, constraint)  # type: ignore[arg-type]
        for child in request.pending_forks:
            child.fork_parent = request
            self.requests[child.req_id] = child
        self.requests[request.req_id] = request
        self._enqueue(request)

    def _enqueue(self, request: Request, front: bool = False) -> None:
        """Put a request in the waiting queue: at the back (new) or the front (preempted,
        or a sibling taking over) under FCFS; by (priority, arrival time) under the
        priority policy, where a preempted request keeps its old arrival time."""
        if self.config.policy != "priority":
            if front:
                self.waiting.appendleft(request)
            else:
                self.waiting.append(request)
            return
        key = (request.priority, request.arrival_time)
        for i, other in enumerate(self.waiting):
            if (other.priority, other.arrival_time) > key:
                self.waiting.insert(i, request)
                return
        self.waiting.append(request)

    def _pick_victim(self, start: int) -> Request:
        """The running request to preempt, among those not yet scheduled this step (from
        index ``start``): the newest under FCFS; under the priority policy the one with the
        highest priority value (the least important), newest first among equals."""
        if self.config.policy != "priority":
            return self.running.pop()
        victim = max(self.running[start:], key=lambda r: (r.priority, r.arrival_time))
        self.running.remove(victim)
        return victim

    def finish_requests(self, req_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests from outside the model loop (abort, stop string); frees their blocks."""
        assert status.is_finished
        done = []
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue
            parent = request.fork_parent
            if parent is not None and request in parent.pending_forks:
                parent.pending_forks.remove(request)  # never started: nothing to free
                request.status = status
                self.requests.pop(req_id, None)
                done.append(request)
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            if request.pending_forks and self.structured is not None:
                # The heir (below) needs the constraint state before it is freed.
                self.structured.fork(request.req_id, request.pending_forks[0].req_id)
            self._free_request(request)
            if request.pending_forks:
                # Its siblings still want to run: the first takes over as the fork parent.
                heir, *rest = request.pending_forks
                request.pending_forks = []
                heir.fork_parent = None
                heir.pending_forks = rest
                for child in rest:
                    child.fork_parent = heir
                self._enqueue(heir, front=True)
            done.append(request)
        return done

    def fork_request(self, parent_id: str, child: Request) -> None:
        """Start ``child`` as a copy of a running request, sharing all its KV blocks."""
        parent = self.requests[parent_id]
        if child.req_id in self.requests:
            raise ValueError(f"request id {child.req_id!r} is already in use")
        self.requests[child.req_id] = child
        if parent.status == RequestStatus.RUNNING:
            self._start_fork(parent, child)
        else:  # the parent was preempted: the child recomputes on its own
            child.num_computed_tokens = 0
            child.status = RequestStatus.WAITING
            self._enqueue(child, front=True)

    def append_token(self, req_id: str, token_id: int) -> None:
        """Append a token chosen outside the sampler (beam search); like every token, it
        reaches the worker with the request's next scheduled step."""
        self.requests[req_id].append_output_token(token_id)

    def _start_fork(self, parent: Request, child: Request) -> None:
        """``child`` runs on from where ``parent`` is, sharing all of its KV blocks."""
        self.kv.fork(parent, child)
        if self.structured is not None:
            self.structured.fork(parent.req_id, child.req_id)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = RequestStatus.RUNNING
        self.running.append(child)

    def _fork_pending(self, parent: Request) -> None:
        for child in parent.pending_forks:
            child.fork_parent = None
            child.num_cached_tokens = parent.num_cached_tokens
            child.first_scheduled_time = parent.first_scheduled_time
            self._start_fork(parent, child)
        parent.pending_forks = []

    def _free_request(self, request: Request) -> None:
        self.kv.free(request)
        if self.structured is not None:
            self.structured.free(request.req_id)
        self.requests.pop(request.req_id, None)
        self._trimmed.pop(request.req_id, None)
        if self._worker_known.pop(request.req_id, None) is not None:
            self._finished_ids.add(request.req_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self._failed)

    def fail_request(self, request: Request) -> None:
        """End a request (and its pending forks) that cannot run, before it was queued;
        reported as aborted with the next step's outputs."""
        for r in (request, *request.pending_forks):
            r.status = RequestStatus.FINISHED_ABORTED
            self._failed.append(r.req_id)

    def take_failed(self) -> list[EngineCoreOutput]:
        """Outputs for the requests that ended without running (see fail_request)."""
        outputs = [
            EngineCoreOutput(req_id=r, new_token_ids=[], finish_reason="abort")
            for r in self._failed
        ]
        self._failed = []
        return outputs

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- scheduling -------------------------------------------------------------------

    def _preempt(self, request: Request) -> None:
        self.kv.free(request, offload=self.swap_on_preempt)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        self._trimmed.pop(request.req_id, None)
        request.num_preemptions += 1
        self.num_preemptions += 1
        if self._worker_known.pop(request.req_id, None) is not None:
            self._finished_ids.add(request.req_id)
        self._enqueue(request, front=True)
        logger.debug("preempted %s (%d tokens)", request.req_id, request.num_tokens)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted_any = False
        now = time.time()
        # Proposed tokens verified this step; requests a draft model proposes for.
        spec_tokens: dict[str, list[int]] = {}
        spec_masks: dict[str, np.ndarray] = {}
        draft_propose: dict[str, int] = {}
        spec_on = self.spec_active

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.pending_forks and request.num_computed_tokens >= request.compute_target:
                self._fork_pending(request)
            num_new = min(request.compute_target - request.num_computed_tokens, budget)
            if num_new <= 0:
                # Nothing to compute (a beam waiting for its group to choose its token).
                i += 1
                continue
            spec: list[int] = []
            if num_new == 1 and request.spec_token_ids and spec_on:
                spec = self._spec_to_verify(request, budget - 1, spec_masks)
                num_new += len(spec)
            lookahead = self._draft_lookahead(request, num_new, spec_on)
            self.kv.free_outside_windows(request)
            new_block_ids = self.kv.allocate_slots(request, num_new, num_lookahead=lookahead)
            while new_block_ids is None:
                victim = self._pick_victim(i)
                self._preempt(victim)
                preempted_any = True
                if victim is request:
                    break
                new_block_ids = self.kv.allocate_slots(request, num_new, num_lookahead=lookahead)
            if new_block_ids is None:
                spec_masks.pop(request.req_id, None)
                break
            request.spec_token_ids = []  # consumed: the next proposals come from this step
            if spec:
                spec_tokens[request.req_id] = spec
            if lookahead:
                draft_propose[request.req_id] = self._spec_k(request)
            num_scheduled[request.req_id] = num_new
            budget -= num_new
            known = self._worker_known.get(request.req_id)
            if known is not None:
                cached_reqs.append(
                    CachedRequestData(
                        req_id=request.req_id,
                        new_block_ids=new_block_ids,
                        replaced_blocks=self.kv.last_replaced,
                        num_computed_tokens=request.num_computed_tokens,
                        new_token_ids=request.all_token_ids[known:],
                        num_blocks_kept=self._trimmed.pop(request.req_id, None),
                    )
                )
                self._worker_known[request.req_id] = request.num_tokens
            else:
                new_reqs.append(self._new_request_data(request))
            i += 1

        skipped: list[Request] = []
        while (
            not preempted_any
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            if not self._grammar_ready(request):
                skipped.append(self.waiting.popleft())  # still compiling: others go first
                continue
            if not self._lora_fits(request):
                skipped.append(self.waiting.popleft())  # its adapter waits for a free slot
                continue
            hits, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_new = min(request.compute_target - num_hit_tokens, budget)
            lookahead = self._draft_lookahead(request, num_new, spec_on, num_hit_tokens)
            from_tier = self.kv.num_tier_hit_blocks(request)
            if self.kv.allocate_slots(request, num_new, hits, lookahead) is None:
                break
            if from_tier and request.status == RequestStatus.PREEMPTED:
                self.num_swapped_in += 1
            self.waiting.popleft()
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            if num_new == 0:
                # Everything but the last prompt token came from the cache: fork now,
                # parent and siblings compute their last token next step.
                self._fork_pending(request)
                continue
            num_scheduled[request.req_id] = num_new
            budget -= num_new
            if lookahead:
                draft_propose[request.req_id] = self._spec_k(request)
            new_reqs.append(self._new_request_data(request))

        for request in reversed(skipped):
            self.waiting.appendleft(request)

        for req_id, n in num_scheduled.items():
            self.requests[req_id].num_computed_tokens += n

        offloads, loads = self.kv.take_tier_ops()
        out = SchedulerOutput(
            kv_offloads=offloads,
            kv_loads=loads,
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            finished_req_ids=self._finished_ids,
            block_copies=self.kv.take_pending_copies(),
            scheduled_spec_tokens=spec_tokens,
            draft_propose=draft_propose,
        )
        if self.structured is not None:
            # The constrained requests that sample this step get their allowed tokens (a
            # row per verified position for those with proposals).
            ids = [
                r for r in num_scheduled
                if self.structured.has(r)
                and self.requests[r].num_computed_tokens >= self.requests[r].num_tokens
            ]  # fmt: skip
            if ids:
                out.structured_req_ids = ids
                plain = [r for r in ids if r not in spec_masks]
                if not spec_masks:
                    out.structured_bitmask = self.structured.bitmask(ids)
                else:
                    rows = dict(zip(plain, self.structured.bitmask(plain))) if plain else {}
                    out.structured_bitmask = np.concatenate(
                        [spec_masks[r] if r in spec_masks else rows[r][None] for r in ids]
                    )
        self._finished_ids = set()
        return out

    # ---- speculative decoding ----------------------------------------------------------

    @property
    def spec_active(self) -> bool:
        """Whether this step speculates: it is configured and the batch is small enough
        for verifying extra tokens to cost less than the steps it saves."""
        return self.spec is not None and len(self.running) <= self.spec.disable_by_batch_size

    def _spec_k(self, request: Request) -> int:
        """Most tokens to propose for a request (0: it does not speculate)."""
        if self.spec is None or request.external_tokens or request.sampling_params.pooling:
            return 0
        want = request.sampling_params.num_speculative_tokens
        k = self.spec.num_speculative_tokens
        return k if want is None else min(want, k)

    def _draft_lookahead(
        self, request: Request, num_new: int, spec_on: bool, num_computed: int | None = None
    ) -> int:
        """KV slots to hold past this step's tokens for a draft model: only for requests
        that sample this step and speculate. The draft writes the KV of the step's last
        token (which the target computes next step) and of its proposals but the last:
        k slots past the verified positions."""
        if not spec_on or self.spec is None or self.spec.method != "draft_model":
            return 0
        done = request.num_computed_tokens if num_computed is None else num_computed
        if done + num_new < request.num_tokens or request.pending_forks:
            return 0
        return self._spec_k(request)

    def _spec_to_verify(
        self, request: Request, room: int, masks: dict[str, np.ndarray]
    ) -> list[int]:
        """The request's proposals that this step verifies: within the token budget, its
        max_tokens (the step adds one token of its own) and, when constrained, the prefix
        its grammar allows (``masks`` then gets the request's allowed-token rows)."""
        n = min(
            len(request.spec_token_ids), self._spec_k(request), room,
            request.max_tokens - request.num_output_tokens - 1,
        )  # fmt: skip
        spec = request.spec_token_ids[: max(n, 0)]
        if spec and self.structured is not None and self.structured.has(request.req_id):
            rows, valid = self.structured.bitmask_with_drafts(request.req_id, spec)
            spec = spec[:valid]
            masks[request.req_id] = rows
        return spec

    def _propose(self, request: Request, drafts: list[int] | None) -> None:
        """Store the proposals for the request's next step (n-gram lookup here; a draft
        model's come from the worker)."""
        k = self._spec_k(request)
        if k == 0 or self.spec is None or not self.spec_active:
            return
        if self.spec.method == "ngram":
            spec = self.spec
            request.spec_token_ids = propose_ngram(
                request.all_token_ids, k, spec.prompt_lookup_min, spec.prompt_lookup_max
            )
        elif drafts:
            request.spec_token_ids = drafts[:k]

    def _lora_fits(self, request: Request) -> bool:
        """Whether admitting the request keeps the running adapters within max_loras."""
        lora_id = request.lora_id
        if lora_id == 0:
            return True
        active = {r.lora_id for r in self.running} - {0}
        return lora_id in active or len(active) < self.max_loras

    def _grammar_ready(self, request: Request) -> bool:
        """Whether a waiting request may be admitted: no constraint, or its grammar is
        compiled. One that failed to compile is finished (reported at the next update)."""
        if self.structured is None or request.sampling_params.structured_outputs is None:
            return True
        if not self.structured.is_ready(request.req_id):
            return False
        if not self.structured.has(request.req_id):
            self.waiting.remove(request)
            request.status = RequestStatus.FINISHED_ABORTED
            self._free_request(request)
            self._failed.append(request.req_id)
            return False
        return True

    def _new_request_data(self, request: Request) -> NewRequestData:
        self._worker_known[request.req_id] = request.num_tokens  # the full list goes along
        return NewRequestData(
            req_id=request.req_id,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=list(request.output_token_ids),
            sampling_params=request.sampling_params,
            block_ids=[list(ids) for ids in request.block_ids],
            num_computed_tokens=request.num_computed_tokens,
            lora_request=request.lora_request,
        )

    # ---- results ----------------------------------------------------------------------

    def update_from_output(
        self, sched: SchedulerOutput, result: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Append sampled tokens, finish requests that stop, free their blocks at once."""
        outputs = self.take_failed()
        for idx, req_id in enumerate(result.req_ids):
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue  # aborted while the step ran
            new_ids = result.sampled_token_ids[idx]
            vector = result.pooled.get(req_id)
            if vector is not None:  # an embedding: its prompt is done, nothing is generated
                request.status = RequestStatus.FINISHED_STOPPED
                self.running.remove(request)
                self._free_request(request)
                outputs.append(
                    EngineCoreOutput(
                        req_id=req_id, new_token_ids=[], finish_reason="stop", pooled=vector,
                        num_cached_tokens=max(request.num_cached_tokens, 0),
                        first_scheduled_time=request.first_scheduled_time,
                    )
                )  # fmt: skip
                continue
            if request.external_tokens:
                # Beam search: report the candidates; the group appends the chosen token.
                lp = result.logprobs[idx] if result.logprobs is not None else None
                if new_ids and lp:
                    outputs.append(
                        EngineCoreOutput(req_id=req_id, new_token_ids=[], new_logprobs=lp)
                    )
                continue
            prompt_lps = result.prompt_logprobs.get(req_id)
            if not new_ids and prompt_lps is None:
                continue
            spec = sched.scheduled_spec_tokens.get(req_id)
            num_drafts = num_accepted = 0
            if spec:
                # The rejected proposals' KV positions are taken back.
                num_drafts, num_accepted = len(spec), len(new_ids) - 1
                request.num_computed_tokens -= num_drafts - num_accepted
                self.spec_num_drafts += 1
                self.spec_num_draft_tokens += num_drafts
                self.spec_num_accepted_tokens += num_accepted
            appended: list[int] = []
            constrained = self.structured is not None and self.structured.has(req_id)
            for tok in new_ids:
                request.append_output_token(tok)
                appended.append(tok)
                grammar_done = constrained and self.structured.accept(req_id, [tok])  # type: ignore[union-attr]
                if request.check_stop():
                    break
                if grammar_done:  # the constraint is complete: nothing else may follow
                    request.status = RequestStatus.FINISHED_STOPPED
                    break
            lps = None
            if result.logprobs is not None and new_ids:
                lp = result.logprobs[idx]
                lps = lp[: len(appended)] if lp is not None else None
            out = EngineCoreOutput(
                req_id=req_id,
                new_token_ids=appended,
                new_logprobs=lps,
                new_prompt_logprobs=prompt_lps,
                num_cached_tokens=max(request.num_cached_tokens, 0),
                first_scheduled_time=request.first_scheduled_time,
                spec_num_draft_tokens=num_drafts,
                spec_num_accepted_tokens=num_accepted,
            )
            if request.is_finished:
                out.finish_reason = request.status.finish_reason
                out.stop_reason = request.stop_reason
                self.running.remove(request)
                self._free_request(request)
            elif new_ids:
                if spec:
                    self._trim_blocks(request)
                self._propose(request, result.draft_token_ids.get(req_id))
            outputs.append(out)
        return outputs

    def _trim_blocks(self, request: Request) -> None:
        """Free the blocks that hold only rejected proposals (a draft model keeps the
        slots its next proposals write)."""
        keep = request.num_tokens
        if self.spec is not None:
            keep += self.spec.num_lookahead_tokens
        kept = self.kv.trim(request, keep)
        if kept is not None and request.req_id in self._worker_known:
            self._trimmed[request.req_id] = min(kept, self._trimmed.get(request.req_id, kept))

    # ---- stats -------------------------------------------------------------------------

    @property
    def kv_cache_usage(self) -> float:
        return self.kv.usage

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (tests)."""
        self.kv.pool.check()
        held = sum(len(self.kv.blocks_of(r)) for r in self.kv.req_to_blocks)
        refs = sum(b.ref_cnt for b in self.kv.pool.blocks)
        assert held == refs, (held, refs)
        for r in self.running:
            assert r.status == RequestStatus.RUNNING
            assert len({len(ids) for ids in r.block_ids}) == 1, "group block tables differ"
            assert len(r.block_ids[0]) * self.block_size >= r.num_computed_tokens
        for r in self.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert not self.kv.blocks_of(r.req_id)
