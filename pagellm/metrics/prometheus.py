"""Prometheus exporter: every metric is named ``pagellm:*`` and lives in its own registry
(so two engines in one process, as in tests, never collide)."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pagellm.metrics.stats import IterationStats, SchedulerStats

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip
_TOKEN_LATENCY_BUCKETS = (
    0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class PrometheusStatLogger:
    def __init__(self, model_name: str, max_loras: int = 0) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r = self.registry
        labels = ["model_name"]

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.ttft = hist(
            "pagellm:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS
        )
        self.itl = hist(
            "pagellm:inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            _TOKEN_LATENCY_BUCKETS,
        )
        self.tpot = hist(
            "pagellm:request_time_per_output_token_seconds",
            "Mean time per output token of a finished request (after the first).",
            _TOKEN_LATENCY_BUCKETS,
        )
        self.e2e = hist(
            "pagellm:e2e_request_latency_seconds", "Arrival to finish.", _LATENCY_BUCKETS
        )
        self.queue = hist(
            "pagellm:request_queue_time_seconds", "Arrival to first scheduling.", _LATENCY_BUCKETS
        )
        self.prefill = hist(
            "pagellm:request_prefill_time_seconds",
            "First scheduling to first token.",
            _LATENCY_BUCKETS,
        )
        self.decode = hist(
            "pagellm:request_decode_time_seconds", "First token to last token.", _LATENCY_BUCKETS
        )
        self.prompt_tokens = Counter(
            "pagellm:prompt_tokens", "Prompt tokens processed.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "pagellm:generation_tokens", "Tokens generated.", labels, registry=r
        )
        self.request_success = Counter(
            "pagellm:request_success",
            "Finished requests by finish reason.",
            [*labels, "finished_reason"],
            registry=r,
        )
        self.prefix_queries = Counter(
            "pagellm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            labels,
            registry=r,
        )
        self.prefix_hits = Counter(
            "pagellm:prefix_cache_hits",
            "Prompt tokens served from the prefix cache.",
            labels,
            registry=r,
        )
        self.preemptions = Counter(
            "pagellm:num_preemptions",
            "Requests preempted for lack of KV blocks.",
            labels,
            registry=r,
        )
        self.running = Gauge(
            "pagellm:num_requests_running", "Requests in the running batch.", labels, registry=r
        )
        self.waiting = Gauge(
            "pagellm:num_requests_waiting", "Requests waiting to be scheduled.", labels, registry=r
        )
        self.kv_usage = Gauge(
            "pagellm:kv_cache_usage_perc", "Share of KV blocks in use (0..1).", labels, registry=r
        )
        # Speculative decoding (vLLM's spec_decode_* counters), and the two figures people
        # read off them: acceptance rate and mean accepted length (since start-up).
        self.spec_drafts = Counter(
            "pagellm:spec_decode_num_drafts",
            "Verification steps of speculative proposals (one per request and step).",
            labels, registry=r,
        )  # fmt: skip
        self.spec_draft_tokens = Counter(
            "pagellm:spec_decode_num_draft_tokens", "Proposed tokens verified.", labels, registry=r
        )
        self.spec_accepted_tokens = Counter(
            "pagellm:spec_decode_num_accepted_tokens",
            "Proposed tokens accepted.",
            labels, registry=r,
        )  # fmt: skip
        self.spec_acceptance = Gauge(
            "pagellm:spec_decode_acceptance_rate",
            "Accepted share of the proposed tokens since start-up (0..1).",
            labels, registry=r,
        )  # fmt: skip
        self.spec_mean_length = Gauge(
            "pagellm:spec_decode_mean_accepted_length",
            "Tokens produced per verification step since start-up (1 + accepted per step).",
            labels, registry=r,
        )  # fmt: skip
        # vLLM's lora_requests_info: one series whose labels name the running and waiting
        # adapters (value: when it was last set); only with LoRA enabled.
        self.max_loras = max_loras
        self.lora_info = (
            Gauge(
                "pagellm:lora_requests_info",
                "LoRA adapters of the running and waiting requests (labels); value: last update time.",
                ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
                registry=r,
            )
            if max_loras
            else None
        )
        self._last_cumulative = SchedulerStats()
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(model_name, reason)

    def record(self, iteration: IterationStats | None, scheduler: SchedulerStats | None) -> None:
        m = self.model_name
        if iteration is not None:
            self.prompt_tokens.labels(m).inc(iteration.num_prompt_tokens)
            self.generation_tokens.labels(m).inc(iteration.num_generation_tokens)
            for v in iteration.time_to_first_tokens:
                self.ttft.labels(m).observe(v)
            for v in iteration.inter_token_latencies:
                self.itl.labels(m).observe(v)
            for f in iteration.finished:
                self.request_success.labels(m, f.finish_reason).inc()
                self.e2e.labels(m).observe(f.e2e_latency)
                self.queue.labels(m).observe(f.queue_time)
                self.prefill.labels(m).observe(f.prefill_time)
                self.decode.labels(m).observe(f.decode_time)
                tpot = f.mean_time_per_output_token
                if tpot is not None:
                    self.tpot.labels(m).observe(tpot)
        if scheduler is not None:
            self.running.labels(m).set(scheduler.num_running)
            self.waiting.labels(m).set(scheduler.num_waiting)
            self.kv_usage.labels(m).set(scheduler.kv_cache_usage)
            last = self._last_cumulative
            self.prefix_queries.labels(m).inc(
                max(scheduler.prefix_cache_queries - last.prefix_cache_queries, 0)
            )
            self.prefix_hits.labels(m).inc(
                max(scheduler.prefix_cache_hits - last.prefix_cache_hits, 0)
            )
            self.preemptions.labels(m).inc(max(scheduler.num_preemptions - last.num_preemptions, 0))
            if scheduler.spec_num_drafts:
                self.spec_drafts.labels(m).inc(
                    max(scheduler.spec_num_drafts - last.spec_num_drafts, 0)
                )
                self.spec_draft_tokens.labels(m).inc(
                    max(scheduler.spec_num_draft_tokens - last.spec_num_draft_tokens, 0)
                )
                self.spec_accepted_tokens.labels(m).inc(
                    max(scheduler.spec_num_accepted_tokens - last.spec_num_accepted_tokens, 0)
                )
                self.spec_acceptance.labels(m).set(
                    scheduler.spec_num_accepted_tokens / scheduler.spec_num_draft_tokens
                )
                self.spec_mean_length.labels(m).set(
                    1 + scheduler.spec_num_accepted_tokens / scheduler.spec_num_drafts
                )
            if self.lora_info is not None:
                self.lora_info.clear()
                self.lora_info.labels(
                    str(self.max_loras), ",".join(scheduler.running_loras),
                    ",".join(scheduler.waiting_loras),
                ).set_to_current_time()  # fmt: skip
            self._last_cumulative = scheduler

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LoggingStatLogger:
    """One log line every ``interval`` seconds: throughput, batch and KV usage."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last = time.monotonic()
        self._prompt = 0
        self._gen = 0

    def record(self, iteration: IterationStats | None, scheduler: SchedulerStats | None) -> None:
        if iteration is not None:
            self._prompt += iteration.num_prompt_tokens
            self._gen += iteration.num_generation_tokens
        now = time.monotonic()
        if scheduler is None or now - self._last < self.interval:
            return
        span = now - self._last
        hit = (
            100.0 * scheduler.prefix_cache_hits / scheduler.prefix_cache_queries
            if scheduler.prefix_cache_queries
            else 0.0
        )
        logger.info(
            "prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, KV %.1f%%, prefix hit %.1f%%",
            self._prompt / span, self._gen / span, scheduler.num_running, scheduler.num_waiting,
            100 * scheduler.kv_cache_usage, hit,
        )  # fmt: skip
        self._last, self._prompt, self._gen = now, 0, 0
