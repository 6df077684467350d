"""Serving metrics on synthetic timestamps: TTFT, TPOT, ITL, percentiles, goodput."""

from __future__ import annotations

import numpy as np
import pytest

from pagellm.benchmarks.datasets import parse_range
from pagellm.benchmarks.metrics import (
    RequestResult,
    compute_metrics,
    parse_goodput,
    percentile_table,
    summarize,
)


def req(start: float, chunks: list[float], end: float, out: int, prompt: int = 10) -> RequestResult:
    return RequestResult(True, start, chunks, end, prompt, out)


def test_per_request_definitions() -> None:
    # Sent at 1.0; chunks at 1.5, 1.6, 1.8, 2.1; stream closed at 2.1; 4 tokens.
    r = req(1.0, [1.5, 1.6, 1.8, 2.1], 2.1, 4)
    assert r.ttft == pytest.approx(0.5)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    assert r.e2el == pytest.approx(1.1)
    assert r.tpot == pytest.approx((1.1 - 0.5) / 3)
    # One output token: no TPOT. No chunk: no TTFT.
    assert req(0, [0.2], 0.2, 1).tpot is None
    assert RequestResult(False, 0, [], 1.0).ttft is None


def test_tpot_uses_server_token_counts_not_chunks() -> None:
    # Two chunks carrying 9 tokens (a server that batches its stream).
    r = req(0.0, [0.4, 1.2], 1.2, 9)
    assert r.tpot == pytest.approx(0.8 / 8)
    assert r.itls == pytest.approx([0.8])


def test_summary_statistics_in_ms() -> None:
    values = [0.010, 0.020, 0.030, 0.040, 0.100]
    s = summarize(values)
    arr = np.array(values) * 1000
    assert s["mean"] == pytest.approx(arr.mean())
    assert s["median"] == pytest.approx(30.0)
    assert s["std"] == pytest.approx(arr.std())
    assert s["p99"] == pytest.approx(np.percentile(arr, 99))
    assert s["p90"] == pytest.approx(76.0)  # linear interpolation between 40 and 100
    assert summarize([])["p99"] == 0.0


def test_run_metrics_throughput_and_failures() -> None:
    results = [
        req(0.0, [0.1, 0.2, 0.3], 0.3, 3, prompt=5),
        req(0.5, [0.7, 0.8], 0.8, 2, prompt=7),
        RequestResult(False, 0.2, [], 0.25, 4, 0, "HTTP 500: boom"),
    ]
    m = compute_metrics(results, duration=2.0)
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["errors"] == ["HTTP 500: boom"]
    assert m["total_input_tokens"] == 12 and m["total_output_tokens"] == 5
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(2.5)
    assert m["total_token_throughput"] == pytest.approx(8.5)
    assert m["ttft_ms"]["mean"] == pytest.approx(150.0)
    # ITLs pooled over requests: 0.1, 0.1, 0.1
    assert m["itl_ms"]["median"] == pytest.approx(100.0)
    assert m["tpot_ms"]["mean"] == pytest.approx((100.0 + 100.0) / 2)
    assert "goodput" not in m


def test_goodput_counts_requests_meeting_every_slo() -> None:
    fast = req(0.0, [0.1, 0.15, 0.2], 0.2, 3)  # ttft 100 ms, tpot 50 ms
    slow_start = req(0.0, [0.9, 0.95], 0.95, 2)  # ttft 900 ms
    slow_decode = req(0.0, [0.1, 0.5, 0.9], 0.9, 3)  # tpot 400 ms
    one_token = req(0.0, [0.2], 0.2, 1)  # no TPOT: only TTFT counts
    slos = parse_goodput("ttft:500,tpot:100")
    assert slos == {"ttft": 0.5, "tpot": 0.1}
    m = compute_metrics([fast, slow_start, slow_decode, one_token], duration=4.0, slos=slos)
    assert m["goodput"] == pytest.approx(2 / 4.0)
    assert m["goodput_slos_ms"] == {"ttft": 500.0, "tpot": 100.0}
    with pytest.raises(ValueError, match="goodput"):
        parse_goodput("latency:5")
    with pytest.raises(ValueError, match="milliseconds"):
        parse_goodput("ttft:fast")


def test_percentile_table_and_ranges() -> None:
    results = [req(0.0, [0.1 * (i + 1)], 0.1 * (i + 1), 1, prompt=10 * (i + 1)) for i in range(10)]
    rows = percentile_table(results)
    assert rows[0][0] == "10%" and rows[-1][0] == "99%"
    p50 = next(r for r in rows if r[0] == "50%")
    assert float(p50[1]) == pytest.approx(
        np.percentile([0.1 * (i + 1) for i in range(10)], 50), abs=1e-4
    )
    assert p50[2] == "-"  # no inter-token gaps with one chunk each
    assert parse_range("32:256") == (32, 256) and parse_range("7") == (7, 7)
    with pytest.raises(ValueError):
        parse_range("9:3")
