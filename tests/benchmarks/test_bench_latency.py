"""`pagellm bench latency` and `pagellm bench roofline` on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch

from pagellm.benchmarks.roofline import MachinePeaks, ModelCosts, model_costs


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pagellm.entrypoints.cli", "--log-level", "WARNING", "bench", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_model_costs_count_the_weights_a_step_reads(tiny_model_dirs: Any, arch: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch], dtype=torch.float32)
    costs = model_costs(model.config, 4)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert costs.matmul_params == linear  # q/k/v/o, gate/up/down and the LM head
    assert costs.lm_head_params == model.lm_head.weight.numel()
    assert costs.weight_bytes == 4 * (linear + norms)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert (
        costs.kv_bytes_per_token
        == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4
    )


def test_latency_json_rows_and_roofline_shares(tiny_model_dirs: Any, tmp_path: Any) -> None:
    out = tmp_path / "lat.json"
    proc = bench(
        "latency", "--model", tiny_model_dirs["LlamaForCausalLM"], "--batch-sizes", "1,2",
        "--input-len", "16", "--output-len", "5", "--num-iters", "1", "--kv-cache-memory", "64MiB",
        "--output-json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "roofline" in proc.stdout.lower()
    report = json.loads(out.read_text())
    assert report["peaks"]["read_bandwidth_gbs"] > 0 and report["peaks"]["matmul_gflops"] > 0
    assert report["peaks"]["compute_peaks"].get("fp32", 1.0) > 0
    costs, peaks = ModelCosts(**report["costs"]), MachinePeaks(**report["peaks"])
    rows = report["rows"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        assert r["prefill_ms"] > 0 and r["decode_step_ms"] > 0
        assert r["decode_tok_s"] == pytest.approx(r["batch_size"] * 1000 / r["decode_step_ms"])
        # shares are the roofline time over the measured time, from the report's own numbers
        best_step = costs.best_step_time(peaks, r["batch_size"], 16 + 5 // 2)
        assert r["decode_roofline_share"] == pytest.approx(best_step * 1000 / r["decode_step_ms"])
        best_prefill = costs.best_prefill_time(peaks, r["batch_size"], 16)
        assert r["prefill_roofline_share"] == pytest.approx(best_prefill * 1000 / r["prefill_ms"])


def test_latency_engine_measures_compute_not_cache_hits(tiny_model_dirs: Any) -> None:
    from pagellm.benchmarks.latency import _pagellm_runner
    from pagellm.entrypoints.cli import build_parser

    args = build_parser().parse_args(
        [
            "bench",
            "latency",
            "--model",
            tiny_model_dirs["LlamaForCausalLM"],
            "--kv-cache-memory",
            "64MiB",
        ]
    )
    engine, run = _pagellm_runner(args)
    assert engine.config.cache.enable_prefix_caching is False
    prompt = list(range(100, 164))
    run([prompt], 2)
    run([prompt], 2)  # the same prompt again: all 64 tokens computed, none cached
    assert engine.core.scheduler.kv.pool.num_cached_blocks == 0


def test_roofline_reports_best_decode_per_batch(tiny_model_dirs: Any, tmp_path: Any) -> None:
    out = tmp_path / "roof.json"
    proc = bench(
        "roofline", "--model", tiny_model_dirs["Qwen2ForCausalLM"], "--batch-sizes", "1,8",
        "--dtype", "float32", "--output-json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Best decode, batch 1" in proc.stdout and "Best decode, batch 8" in proc.stdout
    report = json.loads(out.read_text())
    assert report["costs"]["weight_bytes"] > 0 and report["peaks"]["dtype"] == "float32"


def test_bench_grammar_times_every_backend_on_the_same_path(tmp_path: Any) -> None:
    from pagellm.benchmarks.schemas import SCHEMAS
    from pagellm.core.structured_output import available_backends

    schemas = tmp_path / "schemas.json"
    schemas.write_text(json.dumps(SCHEMAS[:3]))
    out = tmp_path / "grammar.json"
    backends = ",".join(available_backends())
    r = bench("grammar", "--backends", backends, "--schemas", str(schemas), "--tokens", "12",
              "--output-json", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())["backends"]
    assert set(data) == set(available_backends())
    counts = {s["tokens"] for s in data.values()}
    assert len(counts) == 1 and counts.pop() > 3  # every backend walked the same tokens
    for s in data.values():
        assert s["schemas"] == 3 and 0 < s["compile_ms_median"] <= s["compile_ms_max"]
        assert s["token_us_median"] > 0 and s["tokenizer_setup_ms"] > 0
    bad = bench("grammar", "--backends", "nonsense")
    assert bad.returncode != 0 and "not installed" in bad.stderr


def test_compute_peaks_per_unit_and_the_tighter_bound() -> None:
    from pagellm.benchmarks.roofline import measure_compute_peaks
    from pagellm.layers import native

    peaks = measure_compute_peaks(1)
    if native.load() is None:  # no kernels on this host: no instruction peaks, matmul only
        assert peaks == {}
        return
    assert peaks["fp32"] > 1.0 and peaks["int8"] > 1.0
    with open("/proc/cpuinfo") as f:
        has_bf16 = "avx512_bf16" in f.read().split()
    assert ("bf16" in peaks) == (has_bf16 and "avx512" in native.supported_isas())
    machine = MachinePeaks("cpu", "float32", 1, 10.0, 5.0, compute_peaks=peaks)
    # a bf16 model without the dot instruction is bounded by the fp32 rate (converted)
    assert machine.compute_gflops("bf16") == peaks.get("bf16", peaks["fp32"])
    assert machine.compute_gflops("int8") == peaks["int8"]
    costs = ModelCosts(30, 9, 64, 100_000_000, 100_000_000, 0, 1000, compute="int8")
    assert costs.bound(machine, 1, 16) == "memory"  # 1 token: every weight byte for 2 ops
    assert costs.bound(machine, 100_000, 16) == "compute"
    step = costs.best_step_time(machine, 100_000, 16)
    assert step == pytest.approx(costs.decode_flops(100_000, 16) / (peaks["int8"] * 1e9))
