"""`pagellm bench report`: bench JSON -> one self-contained HTML page (two engines side by
side, each kind of result, and files it can't use refused by name)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pagellm.benchmarks import html_report
from pagellm.benchmarks.metrics import RequestResult, compute_metrics
from pagellm.entrypoints.cli import main


def _run(concurrency: int, speed: float) -> dict:
    results = [
        RequestResult(True, start=i * 0.1, chunk_times=[i * 0.1 + 0.05 * k / speed for k in range(1, 9)],
                      end=i * 0.1 + 0.5 / speed, prompt_tokens=16, output_tokens=8)
        for i in range(6)
    ]  # fmt: skip
    m = compute_metrics(results, 1.0 / speed)
    m.update(max_concurrency=concurrency, request_rate="inf", model="m",
             machine={"cpu": "Test CPU", "cpu_count": 2, "cpu_features": ["avx2"]})  # fmt: skip
    return m


def test_two_sweeps_side_by_side(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([_run(1, 1.0), _run(4, 2.0)]))
    b.write_text(json.dumps([_run(1, 0.5), _run(4, 1.0)]))
    out = tmp_path / "r.html"
    assert (
        main(["bench", "report", str(a), str(b), "-o", str(out), "--labels", "pagellm,vllm"]) == 0
    )
    page = out.read_text()
    assert page.count("<svg") == 6 and "<script" not in page and "<link" not in page
    names = re.findall(r'class="series" data-name="([^"]+)"', page)
    assert {"pagellm output tok/s", "vllm output tok/s", "pagellm p99", "vllm median"} <= set(names)
    # The throughput table: one row per run, the faster engine's numbers as measured.
    assert page.count("<td>pagellm</td>") == 2 + 1 and page.count("<td>vllm</td>") == 2 + 1
    assert "Test CPU" in page


def test_throughput_and_latency_results(tmp_path: Path) -> None:
    t = tmp_path / "t.json"
    t.write_text(json.dumps({"backend": "pagellm", "model": "m", "num_prompts": 4, "input_len": "8",
                             "output_len": "8", "elapsed_s": 1.0, "num_prompt_tokens": 32,
                             "num_output_tokens": 32, "requests_per_second": 4.0,
                             "output_throughput": 32.0, "total_token_throughput": 64.0,
                             "dtype": "float32", "date": "", "machine": {}}))  # fmt: skip
    rows = [{"batch_size": b, "input_len": 8, "output_len": 8, "prefill_ms": 10.0 * b,
             "decode_step_ms": 5.0, "decode_tok_s": 200.0 * b, "decode_roofline_share": 0.5,
             "prefill_roofline_share": 0.4} for b in (1, 4)]  # fmt: skip
    lat = tmp_path / "l.json"
    lat.write_text(json.dumps({"backend": "pagellm", "rows": rows, "peaks": {}, "costs": {}}))
    items = html_report.load([str(t), str(lat)])
    assert [it["kind"] for it in items] == ["throughput", "latency"]
    page = html_report.render(items)
    assert "Offline throughput" in page and "Decode throughput vs batch size" in page
    assert page.count("<svg") == 3


def test_bad_inputs_are_refused_by_name(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    assert main(["bench", "report", str(bad), "-o", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "not a pagellm bench result" in err
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert main(["bench", "report", str(broken), "-o", str(tmp_path / "x.html")]) == 2
    assert "broken.json" in capsys.readouterr().err
    assert main(["bench", "report", str(bad), str(broken), "--labels", "one"]) == 2
    assert "1 labels for 2 files" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()
