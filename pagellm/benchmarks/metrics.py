"""Serving metrics from per-request timestamps, with vLLM's definitions.

For a request sent at t0 whose streamed chunks arrive at t1 < t2 < ... < tn:

    TTFT  = t1 - t0                                   time to first token
    ITL   = [t2 - t1, t3 - t2, ...]                   gaps between streamed chunks (pooled)
    E2EL  = tn - t0 (the end of the stream)           end-to-end latency
    TPOT  = (E2EL - TTFT) / (output_tokens - 1)       per request, when output_tokens > 1

Throughputs divide by the wall time of the whole run (first send to last reply):
requests/s, output tokens/s and (prompt + output) tokens/s. Goodput counts only requests
meeting every service-level objective given (e.g. ttft <= 500 ms and tpot <= 50 ms).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)
TABLE_PERCENTILES = (10, 25, 50, 66, 75, 80, 90, 95, 98, 99)


@dataclass
class RequestResult:
    """What one benchmark request saw (times in seconds, relative to anything)."""

    success: bool
    start: float
    chunk_times: list[float] = field(default_factory=list)
    end: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    abandoned: bool = False
    """The client left on purpose (--disconnect-rate): neither a success nor a failure."""

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def e2el(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        ttft = self.ttft
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2el - ttft) / (self.output_tokens - 1)


def summarize(values_s: list[float]) -> dict[str, float]:
    """mean, median, std and percentiles of a list of seconds, reported in ms."""
    if not values_s:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    out = {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    return out


def parse_goodput(spec: str | None) -> dict[str, float]:
    """'ttft:500,tpot:50' -> {'ttft': 0.5, 'tpot': 0.05} (seconds); keys ttft, tpot, e2el."""
    if not spec:
        return {}
    slos: dict[str, float] = {}
    for part in spec.split(","):
        key, _, value = part.strip().partition(":")
        key = key.strip().lower()
        if key not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"goodput takes ttft:MS, tpot:MS and e2el:MS, got {part!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(
                f"goodput value for {key} must be milliseconds, got {value!r}"
            ) from None
        if ms <= 0:
            raise ValueError(f"goodput value for {key} must be positive, got {ms}")
        slos[key] = ms / 1000.0
    return slos


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.e2el}
    for key, limit in slos.items():
        v = values[key]
        if key == "tpot" and v is None:
            continue  # a one-token answer has no TPOT to violate
        if v is None or v > limit:
            return False
    return True


def compute_metrics(
    results: list[RequestResult], duration: float, slos: dict[str, float] | None = None
) -> dict[str, Any]:
    """The run's metrics, with the JSON field names `vllm bench serve` uses."""
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success and not r.abandoned]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [t for t in (r.tpot for r in ok) if t is not None]
    itls = [gap for r in ok for gap in r.itls]
    e2els = [r.e2el for r in ok]
    duration = max(duration, 1e-9)
    out: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(failed),
        "abandoned": sum(r.abandoned for r in results),
        "errors": [r.error for r in failed][:5],
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "ttft_ms": summarize(ttfts),
        "tpot_ms": summarize(tpots),
        "itl_ms": summarize(itls),
        "e2el_ms": summarize(e2els),
    }
    if slos:
        good = sum(1 for r in ok if meets_slos(r, slos))
        out["goodput"] = good / duration
        out["goodput_slos_ms"] = {k: v * 1000 for k, v in slos.items()}
    return out


def percentile_table(results: list[RequestResult]) -> list[list[str]]:
    """evalscope-style rows: percentile, TTFT, ITL, TPOT, latency (s), input and output tokens."""
    ok = [r for r in results if r.success]
    cols = [
        [r.ttft for r in ok if r.ttft is not None],
        [g for r in ok for g in r.itls],
        [t for t in (r.tpot for r in ok) if t is not None],
        [r.e2el for r in ok],
        [float(r.prompt_tokens) for r in ok],
        [float(r.output_tokens) for r in ok],
    ]
    rows = []
    for p in TABLE_PERCENTILES:
        row = [f"{p}%"]
        for i, col in enumerate(cols):
            if not col:
                row.append("-")
            elif i >= 4:
                row.append(f"{np.percentile(col, p):.0f}")
            else:
                row.append(f"{np.percentile(col, p):.4f}")
        rows.append(row)
    return rows
