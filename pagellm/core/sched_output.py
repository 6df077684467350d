"""The only contract between the scheduler (core) and the worker.

``SchedulerOutput`` says what to compute this step; ``ModelRunnerOutput`` says what was
sampled. The worker keeps its own per-request state (token ids, block table, sampling
state) and updates it from these deltas; it never sees a ``Request``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pagellm.lora.request import LoRARequest
    from pagellm.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the worker has no state for: new, or resumed after preemption."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[list[int]]
    """Its block table, one per KV cache group."""
    num_computed_tokens: int
    lora_request: LoRARequest | None = None


@dataclass
class CachedRequestData:
    """A request the worker already holds: only what changed."""

    req_id: str
    new_block_ids: list[list[int]]
    """Blocks appended to the request's block table this step, per KV cache group
    (every group appends as many)."""
    replaced_blocks: list[tuple[int, int, int]] = field(default_factory=list)
    """(group, index in its block table, new block id) after copy-on-write."""
    num_computed_tokens: int = 0
    num_blocks_kept: int | None = None
    """Set when trailing blocks were freed (rejected proposals): the worker keeps this
    many of its block-table entries before appending new_block_ids."""
    new_token_ids: list[int] = field(default_factory=list)
    """The request's tokens appended since the worker last heard of it (sampled by the
    last step, or chosen by beam search): the scheduler owns the token list, the worker
    mirrors it and never appends on its own."""


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    """Tokens to compute this step per request (the order of the batch follows this dict)."""
    total_num_scheduled_tokens: int
    finished_req_ids: set[str] = field(default_factory=set)
    """Requests that ended or were preempted since the last step: the worker drops them."""
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """(src, dst) KV block copies to run before the forward pass (copy-on-write)."""
    kv_offloads: list[tuple[int, int, bytes]] = field(default_factory=list)
    """(block id, tier slot, block hash): evicted blocks to copy into the second KV tier
    before anything else (core/kv_tier.py)."""
    kv_loads: list[tuple[int, int]] = field(default_factory=list)
    """(tier slot, block id): blocks to load back from it, after the offloads."""
    structured_req_ids: list[str] = field(default_factory=list)
    """Constrained requests that sample this step, in the order of structured_bitmask's rows."""
    structured_bitmask: np.ndarray | None = None
    """[rows, ceil(vocab / 32)] int32: bit t of word t // 32 set = token t may be sampled
    (structured outputs); one row per request in structured_req_ids, or 1 + its number of
    scheduled_spec_tokens rows for one whose proposals are verified."""
    scheduled_spec_tokens: dict[str, list[int]] = field(default_factory=dict)
    """Speculative decoding: the proposed tokens verified this step, per request. They are
    counted in num_scheduled_tokens (1 + len per request) but are not the request's
    tokens until accepted."""
    draft_propose: dict[str, int] = field(default_factory=dict)
    """Draft-model speculation: requests the worker's draft proposes for after this step,
    with how many tokens."""

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class TokenLogprobs:
    """Logprobs at one sampled position: the chosen token first, then the top-N."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]
    sampled_token_ids: list[list[int]]
    """Per request in req_ids: the tokens sampled this step (empty mid-prefill)."""
    logprobs: list[list[TokenLogprobs] | None] | None = None
    """Per request in req_ids, when asked: logprobs of each token in sampled_token_ids."""
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    """Per request: logprobs of the prompt tokens covered by this step's chunk."""
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    """A draft model's proposals for the next step (SchedulerOutput.draft_propose)."""
    pooled: dict[str, list[float]] = field(default_factory=dict)
    """Embedding requests whose prompt was completed this step: their pooled vector."""


@dataclass
class BeamResult:
    token_ids: list[int]
    cumulative_logprob: float
    score: float
    """cumulative_logprob / generated_length ** length_penalty"""
    finish_reason: str


@dataclass
class EngineCoreOutput:
    """What one step did for one request, as the scheduler reports it to the engine."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    new_prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    pooled: list[float] | None = None
    """An embedding request's vector (with finish_reason set)."""
    spec_num_draft_tokens: int = 0
    """Speculative decoding: proposals verified this step, and how many were accepted."""
    spec_num_accepted_tokens: int = 0
    beam_results: list[BeamResult] | None = None
    """Set on the final output of a beam search: the returned sequences, best first."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
