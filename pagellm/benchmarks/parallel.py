"""``pagellm bench parallel``: what a step costs on each executor (uni, mp, ray).

For each backend and batch size B, B random prompts of ``--input-len`` tokens decode
``--output-len`` tokens (greedy, ignore_eos). Over the decode steps it reports, per step:

    step_ms       wall time of EngineCore.step (schedule, workers, outputs)
    worker_ms     time inside the output rank's execute_model (its model, sampling)
    host_ms       step_ms - worker_ms: scheduling, the step message to every worker
                  and the result back (pickling, pipes or Ray), output handling
    comm_ms       time inside collectives on the output rank (all-reduce, all-gather,
                  pipeline send/recv) and their count per step

Each backend runs in a process of its own (like every pagellm benchmark), one after the
other, with the same engine flags (--tensor-parallel-size, --pipeline-parallel-size);
``uni`` is the one-worker baseline (sizes 1, the model in the engine's process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from pagellm.benchmarks.report import machine_info, print_grid


def _measure(args: argparse.Namespace, backend: str) -> list[dict[str, Any]]:
    import numpy as np

    from pagellm.engine.arg_utils import EngineArgs
    from pagellm.engine.llm_engine import LLMEngine
    from pagellm.sampling_params import SamplingParams

    engine_args = EngineArgs.from_cli_args(args)
    engine_args.distributed_executor_backend = backend
    if backend == "uni":  # the one-worker baseline: the same model in-process
        engine_args.tensor_parallel_size = engine_args.pipeline_parallel_size = 1
    engine_args.enable_prefix_caching = False
    if backend == "ray":
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    engine = LLMEngine.from_engine_args(engine_args)
    core = engine.core
    vocab = int(engine.config.model.hf_config.vocab_size)
    rows = []
    try:
        for b in args.batch_sizes:
            per_iter = []
            for it in range(args.num_iters):
                rng = np.random.default_rng(it + 7 * b)
                reqs = rng.integers(100, vocab - 100, size=(b, args.input_len)).tolist()
                params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
                for i, ids in enumerate(reqs):
                    engine.add_request(f"{b}-{it}-{i}", {"prompt_token_ids": ids}, params)
                while any(r.num_computed_tokens < r.num_prompt_tokens
                          for r in core.scheduler.requests.values()):  # fmt: skip
                    engine.step()  # prefill
                core.executor.comm_stats(reset=True)
                steps, start = 0, time.perf_counter()
                while engine.has_unfinished_requests():
                    engine.step()
                    steps += 1
                wall = time.perf_counter() - start
                out = core.executor.comm_stats(reset=True)[core.executor.output_rank]
                per_iter.append(
                    {
                        "step_ms": 1e3 * wall / steps,
                        "worker_ms": 1e3 * out["busy"] / steps,
                        "host_ms": 1e3 * (wall - out["busy"]) / steps,
                        "comm_ms": 1e3 * out["seconds"] / steps,
                        "comm_calls": out["calls"] / steps,
                    }
                )
            row: dict[str, Any] = {"backend": backend, "batch_size": b}
            for key in per_iter[0]:
                row[key] = round(statistics.median(p[key] for p in per_iter), 3)
            rows.append(row)
    finally:
        core.shutdown()
    return rows


def run(args: argparse.Namespace) -> int:
    if args.child:
        print(json.dumps(_measure(args, args.child)))
        return 0
    rows: list[dict[str, Any]] = []
    for backend in args.backends:
        argv = [sys.executable, "-m", "pagellm.entrypoints.cli", *sys.argv[1:], "--child", backend]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        rows += json.loads(proc.stdout.strip().splitlines()[-1])
    cols = ["backend", "batch_size", "step_ms", "worker_ms", "host_ms", "comm_ms", "comm_calls"]
    print_grid("per decode step (ms; comm on the output rank)", cols,
               [[r[c] for c in cols] for r in rows])  # fmt: skip
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"machine": machine_info(), "rows": rows, "argv": sys.argv[1:]}, f, indent=1)
    return 0


def add_parser(sub: Any) -> None:
    from pagellm.engine.arg_utils import EngineArgs

    p = sub.add_parser("parallel", help="per-step cost of the uni, mp and ray executors")
    EngineArgs.add_cli_args(p)
    p.add_argument("--backends", nargs="+", default=["uni", "mp", "ray"],
                   choices=("uni", "mp", "ray"))  # fmt: skip
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--output-json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.set_defaults(handler=run)
