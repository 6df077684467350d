"""What the engine reports each step, in plain data for any stat logger.

The output processor fills an ``IterationStats`` while it handles a step's outputs
(first tokens, inter-token gaps, finished requests); the engine core fills a
``SchedulerStats``. Loggers (Prometheus, periodic log lines) only read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FinishedRequestStats:
    finish_reason: str
    e2e_latency: float
    queue_time: float
    prefill_time: float
    decode_time: float
    num_prompt_tokens: int
    num_generation_tokens: int

    @property
    def mean_time_per_output_token(self) -> float | None:
        if self.num_generation_tokens < 2:
            return None
        return self.decode_time / (self.num_generation_tokens - 1)


@dataclass
class IterationStats:
    num_prompt_tokens: int = 0
    """Prompt tokens of requests that produced their first token in this iteration."""
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)


@dataclass
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    num_running_tokens: int = 0
    """Tokens (prompt + output so far) of the running requests: a replica's load."""
    num_waiting_tokens: int = 0
    """Tokens of the waiting (and preempted) requests."""
    kv_cache_usage: float = 0.0
    kv_cache_group_usage: tuple[float, ...] = ()
    """Each KV cache group's share of the blocks (models that mix attention kinds have
    several groups: full attention, sliding windows)."""
    prefix_cache_queries: int = 0
    """Cumulative prompt tokens looked up in the prefix cache."""
    prefix_cache_hits: int = 0
    """Cumulative prompt tokens found there."""
    num_preemptions: int = 0
    """Cumulative preemptions."""
    num_swapped_in: int = 0
    """Cumulative preempted requests that resumed from the second KV tier."""
    kv_tier_blocks_out: int = 0
    """Cumulative blocks copied into the second KV tier (evicted from the main pool)."""
    kv_tier_blocks_in: int = 0
    """Cumulative blocks loaded back from it."""
    kv_tier_bytes_per_block: int = 0
    """Bytes of one block (every layer's K and V), to turn the block counts into bytes."""
    prefix_cache_tier_hits: int = 0
    """Cumulative prompt tokens of the prefix-cache hits that came from the second tier."""
    running_loras: tuple[str, ...] = ()
    """LoRA adapters of the running requests (names, sorted)."""
    waiting_loras: tuple[str, ...] = ()
    """LoRA adapters of the waiting requests."""
    spec_num_drafts: int = 0
    """Cumulative speculative verification steps (a request with proposals, a step)."""
    spec_num_draft_tokens: int = 0
    """Cumulative proposed tokens verified."""
    spec_num_accepted_tokens: int = 0
    """Cumulative proposed tokens accepted."""
