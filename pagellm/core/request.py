"""Request: the scheduler's view of one sequence.

A request is only tokens and counters: ``num_computed_tokens`` of ``num_tokens`` have
KV in the cache. A prefill chunk, a decode step, a prefix-cache hit and a recompute
after preemption are all the same thing: computing the next tokens up to num_tokens.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagellm.lora.request import LoRARequest
    from pagellm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything from here on is finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One sequence being generated.

    Owned by the scheduler. ``block_ids`` is written only by the KV cache manager;
    ``output_token_ids`` only by ``Scheduler.update_from_output``.
    """

    def __init__(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        max_model_len: int | None = None,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        self.req_id = req_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.cache_salt = cache_salt
        self.lora_request = lora_request
        self.priority = 0  # lower runs first under the priority policy
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = (
            -1
        )  # prompt tokens served by the prefix cache; -1: not yet looked up
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        # Sibling requests (n > 1, best_of) that will fork from this one once its prompt
        # is computed up to the last token, sharing every KV block.
        self.pending_forks: list[Request] = []
        self.fork_parent: Request | None = None
        # Tokens are chosen outside the sampler (beam search): the scheduler appends them.
        self.external_tokens = sampling_params.use_beam_search
        self.block_ids: list[list[int]] = []
        """One list per KV cache group (empty until the KV cache manager allocates)."""
        # Speculative decoding: tokens proposed for the next step (not yet verified, not
        # part of all_token_ids).
        self.spec_token_ids: list[int] = []
        # Full-block hashes of all_token_ids, extended lazily by the KV cache manager.
        self.block_hashes: list[bytes] = []
        limit = max_model_len if max_model_len is not None else 1 << 62
        want = sampling_params.max_tokens
        budget = limit - len(self.prompt_token_ids)
        self.max_tokens = budget if want is None else min(want, budget)

    @property
    def compute_target(self) -> int:
        """How many tokens to compute before the next step can sample: all of them, or,
        while siblings wait to fork, all but the last (each fork computes it itself)."""
        return self.num_tokens - 1 if self.pending_forks else self.num_tokens

    @property
    def needs_every_position(self) -> bool:
        """Whether every prompt position must be computed (no prefix-cache hits): prompt
        logprobs, or an embedding pooled over the whole prompt."""
        p = self.sampling_params
        return p.prompt_logprobs is not None or (
            p.pooling is not None and p.pooling.pooling_type == "mean"
        )

    @property
    def lora_id(self) -> int:
        """The adapter's id; 0 for the base model."""
        return self.lora_request.lora_int_id if self.lora_request is not None else 0

    @property
    def cache_key(self) -> object:
        """What keeps this request's prefix-cache blocks apart from others' with the same
        tokens: its cache salt and its adapter."""
        if self.lora_request is None:
            return self.cache_salt
        return (self.cache_salt, self.lora_request.cache_key)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def fork(self, req_id: str) -> Request:
        """A copy with the same tokens (and block hashes); blocks are shared by the KV manager."""
        child = Request(
            req_id,
            self.prompt_token_ids,
            self.sampling_params,
            tuple(self.eos_token_ids),
            None,
            self.arrival_time,
            self.cache_salt,
            self.lora_request,
        )
        child.max_tokens = self.max_tokens
        child.output_token_ids = list(self.output_token_ids)
        child.all_token_ids = list(self.all_token_ids)
        child.block_hashes = list(self.block_hashes)
        child.num_cached_tokens = self.num_cached_tokens
        child.first_scheduled_time = self.first_scheduled_time
        child.priority = self.priority
        return child

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self) -> bool:
        """Set a finished status if the last output token ends the request."""
        params = self.sampling_params
        n_out = self.num_output_tokens
        if n_out >= self.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        if n_out < params.min_tokens:
            return False
        last = self.output_token_ids[-1]
        if not params.ignore_eos and last in self.eos_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED
            return True
        if params.stop_token_ids and last in params.stop_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED
            self.stop_reason = last
            return True
        return False

    def __repr__(self) -> str:
        return (
            f"Request({self.req_id!r}, status={self.status.name}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens}, blocks={len(self.block_ids[0]) if self.block_ids else 0})"
        )
