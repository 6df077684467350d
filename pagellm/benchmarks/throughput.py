"""``pagellm bench throughput``: offline throughput on a random token-id workload.

Every request gets a prompt of random token ids with a length drawn from
``--input-len A:B`` and generates exactly ``--output-len C:D`` tokens (ignore_eos).
``--backend hf`` runs the same requests through transformers ``generate`` in static,
left-padded batches (the baseline of vLLM's own benchmark_throughput): a batch runs
until its longest output is done, and only the requested tokens are counted. Both
backends decode greedily in the same dtype and thread count, each in its own process
(the transformers one never loads pagellm's kernels).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from pagellm.benchmarks.datasets import RandomRequest, parse_range, sample_random_token_requests
from pagellm.benchmarks.report import machine_info, print_table

logger = logging.getLogger(__name__)


@dataclass
class ThroughputResult:
    backend: str
    model: str
    num_prompts: int
    input_len: str
    output_len: str
    elapsed_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    requests_per_second: float
    output_throughput: float
    total_token_throughput: float
    dtype: str
    date: str
    machine: dict[str, Any]


def run_pagellm(requests: list[RandomRequest], args: argparse.Namespace) -> tuple[float, str, str]:
    from pagellm.engine.arg_utils import EngineArgs
    from pagellm.entrypoints.llm import LLM
    from pagellm.sampling_params import SamplingParams

    engine_args = EngineArgs.from_cli_args(args)
    llm = LLM(**{k: v for k, v in vars(engine_args).items()})
    params = [
        SamplingParams(temperature=0, ignore_eos=True, max_tokens=r.output_len) for r in requests
    ]
    prompts = [r.prompt_token_ids for r in requests]
    # Warm up allocator and kernels on a couple of requests first.
    llm.generate(
        prompts[:2],
        [SamplingParams(max_tokens=4, ignore_eos=True)] * min(2, len(prompts)),
        use_tqdm=False,
    )
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    expected = sum(r.output_len for r in requests)
    if produced != expected:
        raise RuntimeError(f"pagellm produced {produced} output tokens, expected {expected}")
    return elapsed, llm.engine.config.model.served_model_name, llm.engine.config.model.dtype


def run_hf(requests: list[RandomRequest], args: argparse.Namespace) -> tuple[float, str, str]:
    """transformers generate in static batches of up to --hf-max-batch-size prompts."""
    import torch

    from pagellm.engine.arg_utils import EngineArgs
    from pagellm.models.loader import resolve_model_path

    engine_args = EngineArgs.from_cli_args(args)
    model_path = resolve_model_path(engine_args.model)
    dtype_name = engine_args._resolve_dtype(engine_args._resolve_device())
    model = load_hf_model(model_path, getattr(torch, dtype_name))
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    pad_id = model.config.pad_token_id
    if pad_id is None:
        pad_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    batches: list[list[RandomRequest]] = []
    batch: list[RandomRequest] = []
    for i, r in enumerate(requests):
        batch.append(r)
        if len(batch) < args.hf_max_batch_size and i + 1 < len(requests):
            nxt = requests[i + 1]
            longest = max(max(b.prompt_len for b in batch), nxt.prompt_len)
            most_out = max(max(b.output_len for b in batch), nxt.output_len)
            if longest + most_out <= 2048:
                continue
        batches.append(batch)
        batch = []

    def run_batch(batch: list[RandomRequest]) -> None:
        width = max(r.prompt_len for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, r in enumerate(batch):
            ids[j, width - r.prompt_len :] = torch.tensor(r.prompt_token_ids)
            mask[j, width - r.prompt_len :] = 1
        max_out = max(r.output_len for r in batch)
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_out,
            min_new_tokens=max_out,
            pad_token_id=pad_id,
            use_cache=True,
        )

    check_clean_baseline_process()
    with torch.inference_mode():
        run_batch([requests[0]])  # warm-up
        start = time.perf_counter()
        for b in batches:
            run_batch(b)
        elapsed = time.perf_counter() - start
    return elapsed, model_path.rsplit("/", 1)[-1], dtype_name


def check_clean_baseline_process() -> None:
    """The transformers baseline must run where pagellm's kernels never loaded (they
    share the OpenMP runtime and the allocator settings with torch)."""
    from pagellm.layers import native

    if native.loaded():
        raise RuntimeError("pagellm's CPU kernels were loaded in the baseline's process")


def load_hf_model(model_path: str, dtype: Any) -> Any:
    """The reference transformers model for a directory or GGUF file (needs accelerate for GGUF)."""
    import os

    from transformers import AutoModelForCausalLM

    if model_path.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(model_path), gguf_file=os.path.basename(model_path), dtype=dtype
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return model.eval()


def run(args: argparse.Namespace) -> int:
    from pagellm.engine.arg_utils import EngineArgs
    from pagellm.engine.tokenizer import load_tokenizer
    from pagellm.models.loader import resolve_model_path

    engine_args = EngineArgs.from_cli_args(args)
    model_path = resolve_model_path(engine_args.model)
    tokenizer = load_tokenizer(engine_args.tokenizer or model_path)
    requests = sample_random_token_requests(
        tokenizer,
        args.num_prompts,
        parse_range(args.input_len),
        parse_range(args.output_len),
        args.seed,
    )
    runner = run_hf if args.backend == "hf" else run_pagellm
    elapsed, model_name, dtype = runner(requests, args)
    n_in = sum(r.prompt_len for r in requests)
    n_out = sum(r.output_len for r in requests)
    result = ThroughputResult(
        backend=args.backend,
        model=model_name,
        num_prompts=len(requests),
        input_len=args.input_len,
        output_len=args.output_len,
        elapsed_s=elapsed,
        num_prompt_tokens=n_in,
        num_output_tokens=n_out,
        requests_per_second=len(requests) / elapsed,
        output_throughput=n_out / elapsed,
        total_token_throughput=(n_in + n_out) / elapsed,
        dtype=dtype,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        machine=machine_info(),
    )
    print_table(
        f"Offline throughput ({args.backend})",
        [
            ("Model", model_name),
            ("Requests", len(requests)),
            ("Elapsed (s)", f"{elapsed:.2f}"),
            ("Prompt tokens", n_in),
            ("Output tokens", n_out),
            ("Requests/s", f"{result.requests_per_second:.3f}"),
            ("Output tok/s", f"{result.output_throughput:.2f}"),
            ("Total tok/s", f"{result.total_token_throughput:.2f}"),
        ],
    )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(asdict(result), f, indent=2)
    return 0


def add_parser(sub: Any) -> None:
    from pagellm.engine.arg_utils import EngineArgs

    p = sub.add_parser("throughput", help="offline throughput, pagellm or transformers")
    p.add_argument("--backend", choices=("pagellm", "hf"), default="pagellm")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", default="32:256", help="prompt length range A:B (or one number)")
    p.add_argument("--output-len", default="32:256", help="output length range C:D (or one number)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload and the engine")
    p.add_argument(
        "--hf-max-batch-size", type=int, default=64, help="static batch size of --backend hf"
    )
    p.add_argument("--output-json", default=None)
    p.add_argument("--no-progress", action="store_true")
    EngineArgs.add_cli_args(p, skip=("seed",))  # --seed seeds the workload and the engine
    p.set_defaults(handler=run)
