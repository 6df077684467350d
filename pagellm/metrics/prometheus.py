"""Prometheus exporter: every metric is named ``pagellm:*`` and lives in its own registry
(so two engines in one process, as in tests, never collide).

Every series carries ``model_name`` and ``engine`` (the data-parallel replica, "0" with
one), as vLLM's do. The gauges a router or dashboard built for vLLM reads (llm-d's
scorers, vLLM's Grafana board) are exported under vLLM's names too:
``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc``, ``vllm:prefix_cache_queries``/``hits`` and
``vllm:lora_requests_info``. ``pagellm:engine_alive`` is 1 per live replica, 0 once dead.
"""

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
    def __init__(self, model_name: str, max_loras: int = 0, num_engines: int = 1) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r = self.registry
        labels = ["model_name", "engine"]

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
        # The second KV tier (swap on preemption, prefix-cache offload).
        self.swapped_in = Counter(
            "pagellm:num_requests_swapped_in",
            "Preempted requests resumed from the second KV tier instead of recomputed.",
            labels, registry=r,
        )  # fmt: skip
        self.tier_bytes_out = Counter(
            "pagellm:kv_tier_bytes_out", "KV bytes copied into the second tier (evictions).",
            labels, registry=r,
        )  # fmt: skip
        self.tier_bytes_in = Counter(
            "pagellm:kv_tier_bytes_in", "KV bytes loaded back from the second tier.",
            labels, registry=r,
        )  # fmt: skip
        self.tier_hits = Counter(
            "pagellm:prefix_cache_tier_hits",
            "Prompt tokens of prefix-cache hits loaded from the second KV tier.",
            labels, registry=r,
        )  # fmt: skip
        self.running = Gauge(
            "pagellm:num_requests_running", "Requests in the running batch.", labels, registry=r
        )
        self.waiting = Gauge(
            "pagellm:num_requests_waiting", "Requests waiting to be scheduled.", labels, registry=r
        )
        self.kv_usage = Gauge(
            "pagellm:kv_cache_usage_perc", "Share of KV blocks in use (0..1).", labels, registry=r
        )
        self.kv_group_usage = Gauge(
            "pagellm:kv_cache_group_usage_perc",
            "Share of KV blocks held per cache group (0..1); group 0 is full attention "
            "when any layer is.",
            [*labels, "group"],
            registry=r,
        )
        self.alive = Gauge(
            "pagellm:engine_alive", "1 while the engine replica serves, 0 once it died.",
            labels, registry=r,
        )  # fmt: skip
        # The same figures under vLLM's names (routers and dashboards written for vLLM).
        self.vllm_running = Gauge(
            "vllm:num_requests_running", "Requests in the running batch.", labels, registry=r
        )
        self.vllm_waiting = Gauge(
            "vllm:num_requests_waiting", "Requests waiting to be scheduled.", labels, registry=r
        )
        self.vllm_kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "Share of KV blocks in use (0..1).", labels, registry=r
        )
        self.vllm_prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
            labels, registry=r,
        )  # fmt: skip
        self.vllm_prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.",
            labels, registry=r,
        )  # fmt: skip
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
        lora_labels = ["engine", "max_lora", "running_lora_adapters", "waiting_lora_adapters"]
        self.lora_infos = (
            [
                Gauge(
                    f"{prefix}:lora_requests_info",
                    "LoRA adapters of the running and waiting requests (labels); value: "
                    "last update time.",
                    lora_labels,
                    registry=r,
                )
                for prefix in ("pagellm", "vllm")
            ]
            if max_loras
            else []
        )
        self._last_cumulative: dict[str, SchedulerStats] = {}
        self._lora_series: dict[str, tuple[str, ...]] = {}
        for e in map(str, range(num_engines)):
            for reason in ("stop", "length", "abort"):
                self.request_success.labels(model_name, e, reason)
            self.alive.labels(model_name, e).set(1)
            for gauge in (self.running, self.waiting, self.kv_usage, self.vllm_running,
                          self.vllm_waiting, self.vllm_kv_usage):  # fmt: skip
                gauge.labels(model_name, e).set(0)
            for counter in (self.prompt_tokens, self.generation_tokens, self.prefix_queries,
                            self.prefix_hits, self.vllm_prefix_queries, self.vllm_prefix_hits,
                            self.preemptions):  # fmt: skip
                counter.labels(model_name, e)

    def engine_died(self, engine: int) -> None:
        self.alive.labels(self.model_name, str(engine)).set(0)

    def record(
        self, iteration: IterationStats | None, scheduler: SchedulerStats | None, engine: int = 0
    ) -> None:
        m, e = self.model_name, str(engine)
        if iteration is not None:
            self.prompt_tokens.labels(m, e).inc(iteration.num_prompt_tokens)
            self.generation_tokens.labels(m, e).inc(iteration.num_generation_tokens)
            for v in iteration.time_to_first_tokens:
                self.ttft.labels(m, e).observe(v)
            for v in iteration.inter_token_latencies:
                self.itl.labels(m, e).observe(v)
            for f in iteration.finished:
                self.request_success.labels(m, e, f.finish_reason).inc()
                self.e2e.labels(m, e).observe(f.e2e_latency)
                self.queue.labels(m, e).observe(f.queue_time)
                self.prefill.labels(m, e).observe(f.prefill_time)
                self.decode.labels(m, e).observe(f.decode_time)
                tpot = f.mean_time_per_output_token
                if tpot is not None:
                    self.tpot.labels(m, e).observe(tpot)
        if scheduler is not None:
            for running, waiting, usage in (
                (self.running, self.waiting, self.kv_usage),
                (self.vllm_running, self.vllm_waiting, self.vllm_kv_usage),
            ):
                running.labels(m, e).set(scheduler.num_running)
                waiting.labels(m, e).set(scheduler.num_waiting)
                usage.labels(m, e).set(scheduler.kv_cache_usage)
            for g, share in enumerate(scheduler.kv_cache_group_usage):
                self.kv_group_usage.labels(m, e, str(g)).set(share)
            last = self._last_cumulative.get(e, SchedulerStats())
            queries = max(scheduler.prefix_cache_queries - last.prefix_cache_queries, 0)
            hits = max(scheduler.prefix_cache_hits - last.prefix_cache_hits, 0)
            for q, h in ((self.prefix_queries, self.prefix_hits),
                         (self.vllm_prefix_queries, self.vllm_prefix_hits)):  # fmt: skip
                q.labels(m, e).inc(queries)
                h.labels(m, e).inc(hits)
            self.preemptions.labels(m, e).inc(
                max(scheduler.num_preemptions - last.num_preemptions, 0)
            )
            per_block = scheduler.kv_tier_bytes_per_block
            for counter, now, before in (
                (self.swapped_in, scheduler.num_swapped_in, last.num_swapped_in),
                (self.tier_bytes_out, scheduler.kv_tier_blocks_out * per_block,
                 last.kv_tier_blocks_out * per_block),
                (self.tier_bytes_in, scheduler.kv_tier_blocks_in * per_block,
                 last.kv_tier_blocks_in * per_block),
                (self.tier_hits, scheduler.prefix_cache_tier_hits, last.prefix_cache_tier_hits),
            ):  # fmt: skip
                if now > before:
                    counter.labels(m, e).inc(now - before)
            if scheduler.spec_num_drafts:
                self.spec_drafts.labels(m, e).inc(
                    max(scheduler.spec_num_drafts - last.spec_num_drafts, 0)
                )
                self.spec_draft_tokens.labels(m, e).inc(
                    max(scheduler.spec_num_draft_tokens - last.spec_num_draft_tokens, 0)
                )
                self.spec_accepted_tokens.labels(m, e).inc(
                    max(scheduler.spec_num_accepted_tokens - last.spec_num_accepted_tokens, 0)
                )
                self.spec_acceptance.labels(m, e).set(
                    scheduler.spec_num_accepted_tokens / scheduler.spec_num_draft_tokens
                )
                self.spec_mean_length.labels(m, e).set(
                    1 + scheduler.spec_num_accepted_tokens / scheduler.spec_num_drafts
                )
            if self.lora_infos:
                labels = (
                    e, str(self.max_loras), ",".join(scheduler.running_loras),
                    ",".join(scheduler.waiting_loras),
                )  # fmt: skip
                previous = self._lora_series.get(e)
                for info in self.lora_infos:  # one series per engine: drop its last one
                    if previous is not None and previous != labels:
                        info.remove(*previous)
                    info.labels(*labels).set_to_current_time()
                self._lora_series[e] = labels
            self._last_cumulative[e] = scheduler

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LoggingStatLogger:
    """One log line every ``interval`` seconds: throughput, batch and KV usage."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last = time.monotonic()
        self._prompt = 0
        self._gen = 0

    def record(
        self, iteration: IterationStats | None, scheduler: SchedulerStats | None, engine: int = 0
    ) -> None:
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
