"""``pagellm bench latency``: prefill time and per-step decode time at fixed batch sizes,
as a share of the roofline (see roofline.py), for pagellm or transformers ``generate``.

For each batch size B, B random prompts of ``--input-len`` tokens each generate
``--output-len`` tokens (greedy, ignore_eos). Prefill time is until every request has its
first token; a decode step is (end - prefill) / (output_len - 1). Medians of ``--num-iters``.

Both backends run at their best and on equal terms: greedy, the same dtype and thread
count, each in a process of its own where nothing else ran (the roofline probe runs in a
child process; ``--backend hf`` never loads pagellm's kernels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from pagellm.benchmarks.datasets import sample_random_token_requests
from pagellm.benchmarks.report import machine_info, print_grid
from pagellm.benchmarks.roofline import (
    MachinePeaks,
    ModelCosts,
    compute_kind,
    measure_machine_isolated,
    model_costs,
    step_weight_bytes,
)


@dataclass
class LatencyRow:
    batch_size: int
    input_len: int
    output_len: int
    prefill_ms: float
    decode_step_ms: float
    decode_tok_s: float
    decode_roofline_share: float
    prefill_roofline_share: float
    decode_host_ms: float | None = None
    """Of a decode step, the time outside the model's forward pass and LM head: batch
    building, sampling, scheduling, detokenization (pagellm only)."""


def _pagellm_runner(args: argparse.Namespace) -> tuple[Any, Any]:
    from pagellm.engine.arg_utils import EngineArgs
    from pagellm.engine.llm_engine import LLMEngine
    from pagellm.sampling_params import SamplingParams

    engine_args = EngineArgs.from_cli_args(args)
    # Latency measures compute: batch b's random prompts start with batch b/2's (same
    # seed), and a prefix-cache hit would make prefill look faster than the machine.
    engine_args.enable_prefix_caching = False
    engine = LLMEngine.from_engine_args(engine_args)
    # Time spent in the model (forward and LM head), to tell it from the host's share.
    model = engine.core.runner.model
    in_model = [0.0]

    def timed(fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                in_model[0] += time.perf_counter() - t

        return wrapper

    model.forward = timed(model.forward)
    model.compute_logits = timed(model.compute_logits)

    def run(prompts: list[list[int]], output_len: int) -> tuple[float, float, float]:
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(f"lat-{time.monotonic_ns()}-{i}", p, params)
        started = time.perf_counter()
        first_token_at = None
        model_at_first = 0.0
        have_first: set[str] = set()
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.outputs[0].token_ids:
                    have_first.add(out.request_id)
            if first_token_at is None and len(have_first) == len(prompts):
                first_token_at = time.perf_counter()
                model_at_first = in_model[0]
        end = time.perf_counter()
        assert first_token_at is not None
        steps = max(output_len - 1, 1)
        decode = end - first_token_at
        host = decode - (in_model[0] - model_at_first)
        return first_token_at - started, decode / steps, host / steps

    return engine, run


def _hf_runner(args: argparse.Namespace, dtype: str) -> tuple[Any, Any]:
    import torch

    from pagellm.benchmarks.throughput import check_clean_baseline_process, load_hf_model
    from pagellm.engine.arg_utils import EngineArgs
    from pagellm.models.loader import resolve_model_path

    engine_args = EngineArgs.from_cli_args(args)
    model = load_hf_model(resolve_model_path(engine_args.model), getattr(torch, dtype))
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    check_clean_baseline_process()

    def gen(ids: torch.Tensor, n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=n, min_new_tokens=n, pad_token_id=0)  # fmt: skip
        return time.perf_counter() - start

    def run(prompts: list[list[int]], output_len: int) -> tuple[float, float, float | None]:
        ids = torch.tensor(prompts)
        prefill = gen(ids, 1)
        total = gen(ids, output_len)
        return prefill, (total - prefill) / max(output_len - 1, 1), None

    return model, run


def run(args: argparse.Namespace) -> int:
    from pagellm.engine.arg_utils import EngineArgs
    from pagellm.engine.tokenizer import load_tokenizer

    engine_args = EngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config()
    tokenizer = load_tokenizer(config.model.tokenizer)
    engine, runner = (
        _hf_runner(args, config.model.dtype) if args.backend == "hf" else _pagellm_runner(args)
    )
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[config.model.dtype]
    if args.backend == "hf":
        costs: ModelCosts = model_costs(config.model.hf_config, dtype_bytes)
    else:  # what the engine stores: quantized weights and KV count as they are
        costs = model_costs(
            config.model.hf_config, dtype_bytes, step_weight_bytes(engine.core.runner.model),
            round(engine.plan.kv_bytes_per_context_token), compute_kind(config),
        )  # fmt: skip
    peaks: MachinePeaks = measure_machine_isolated(
        config.device.device, config.model.dtype, config.device.num_threads
    )
    rows: list[LatencyRow] = []
    for batch in args.batch_sizes:
        prefills, steps, hosts = [], [], []
        runner(
            [
                r.prompt_token_ids
                for r in sample_random_token_requests(
                    tokenizer, batch, (args.input_len,) * 2, (2, 2), 999
                )
            ],
            4,
        )  # warm-up
        for it in range(args.num_iters):
            reqs = sample_random_token_requests(
                tokenizer, batch, (args.input_len,) * 2, (1, 1), args.seed + it
            )
            prefill, step, host = runner([r.prompt_token_ids for r in reqs], args.output_len)
            prefills.append(prefill)
            steps.append(step)
            if host is not None:
                hosts.append(host)
        prefill, step = statistics.median(prefills), statistics.median(steps)
        ctx = args.input_len + args.output_len // 2
        best_step = costs.best_step_time(peaks, batch, ctx)
        best_prefill = costs.best_prefill_time(peaks, batch, args.input_len)
        rows.append(
            LatencyRow(
                batch,
                args.input_len,
                args.output_len,
                prefill * 1e3,
                step * 1e3,
                batch / step,
                best_step / step,
                best_prefill / prefill,
                statistics.median(hosts) * 1e3 if hosts else None,
            )
        )
    print(
        f"\nMachine: {peaks.read_bandwidth_gbs:.1f} GB/s read, {peaks.matmul_gflops:.0f} GFLOP/s "
        f"{peaks.dtype} matmul (best measured), {peaks.compute_gflops(costs.compute):.0f} G ops/s "
        f"{costs.compute} peak, {peaks.threads} threads; weights {costs.weight_bytes / 1e6:.0f} MB/step"
    )
    print_grid(
        f"Latency ({args.backend}, input {args.input_len}, output {args.output_len}, median of {args.num_iters})",
        [
            "batch",
            "prefill ms",
            "decode step ms",
            "decode tok/s",
            "decode % roofline",
            "prefill % roofline",
            "host ms/step",
        ],
        [
            [
                r.batch_size,
                f"{r.prefill_ms:.1f}",
                f"{r.decode_step_ms:.2f}",
                f"{r.decode_tok_s:.1f}",
                f"{100 * r.decode_roofline_share:.0f}%",
                f"{100 * r.prefill_roofline_share:.0f}%",
                "-" if r.decode_host_ms is None else f"{r.decode_host_ms:.2f}",
            ]
            for r in rows
        ],
    )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(
                {"backend": args.backend, "rows": [asdict(r) for r in rows], "peaks": asdict(peaks),
                 "costs": asdict(costs), "machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M")},
                f, indent=2,
            )  # fmt: skip
    return 0


def add_parser(sub: Any) -> None:
    from pagellm.engine.arg_utils import EngineArgs

    p = sub.add_parser(
        "latency", help="prefill and decode-step latency per batch size, vs the roofline"
    )
    p.add_argument("--backend", choices=("pagellm", "hf"), default="pagellm")
    p.add_argument(
        "--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16]
    )
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(p, skip=("seed",))
    p.set_defaults(handler=run)
