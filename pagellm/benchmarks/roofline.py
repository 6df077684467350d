"""The roofline: what this machine and this model allow at best.

A decode step of batch B at context length L must read every weight once plus each
sequence's KV, and do 2 FLOPs per weight per token plus attention:

    bytes(B, L) = weight_bytes + B * L * kv_bytes_per_token
    flops(B, L) = B * (2 * matmul_params + 4 * layers * q_heads * head_dim * L)
    best step   = max(bytes / bandwidth, flops / peak_flops)

``pagellm bench roofline`` prints the model's side and the machine's measured peaks
(streaming read bandwidth and dense matmul FLOP/s in the run dtype); ``bench latency``
reports each measured step as a share of this bound.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from pagellm.benchmarks.report import machine_info, print_table


@dataclass
class MachinePeaks:
    device: str
    dtype: str
    threads: int
    read_bandwidth_gbs: float
    matmul_gflops: float


@dataclass
class ModelCosts:
    num_layers: int
    num_q_heads: int
    head_dim: int
    weight_bytes: int
    matmul_params: int
    lm_head_params: int
    kv_bytes_per_token: int

    def decode_bytes(self, batch: int, context: int) -> float:
        return self.weight_bytes + batch * context * self.kv_bytes_per_token

    def decode_flops(self, batch: int, context: int) -> float:
        attn = 4 * self.num_layers * self.num_q_heads * self.head_dim * context
        return batch * (2 * self.matmul_params + attn)

    def prefill_flops(self, batch: int, prompt_len: int) -> float:
        """Every prompt token through the layers; the LM head only for the last one."""
        attn = 2 * self.num_layers * self.num_q_heads * self.head_dim * prompt_len * prompt_len
        body = self.matmul_params - self.lm_head_params
        return batch * (2 * body * prompt_len + 2 * self.lm_head_params + attn)

    def best_step_time(self, peaks: MachinePeaks, batch: int, context: int) -> float:
        return max(
            self.decode_bytes(batch, context) / (peaks.read_bandwidth_gbs * 1e9),
            self.decode_flops(batch, context) / (peaks.matmul_gflops * 1e9),
        )


def model_costs(hf_config: Any, dtype_bytes: int) -> ModelCosts:
    """Bytes and FLOPs of a Llama-family model from its config (no weights needed)."""
    from pagellm.models.llama import head_dim_of

    h = hf_config.hidden_size
    layers = hf_config.num_hidden_layers
    q_heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or q_heads
    d = head_dim_of(hf_config)
    inter = hf_config.intermediate_size
    vocab = hf_config.vocab_size
    per_layer = h * (q_heads + 2 * kv_heads) * d + q_heads * d * h + 3 * h * inter
    matmul_params = layers * per_layer + vocab * h  # + LM head
    norms = layers * 2 * h + h
    # Tied or not, a step reads the LM head whole; an untied embedding table is only
    # looked up (B rows), so it does not count.
    return ModelCosts(
        num_layers=layers,
        num_q_heads=q_heads,
        head_dim=d,
        weight_bytes=(matmul_params + norms) * dtype_bytes,
        matmul_params=matmul_params,
        lm_head_params=vocab * h,
        kv_bytes_per_token=layers * 2 * kv_heads * d * dtype_bytes,
    )


def _best_of(fn: Any, repeats: int, warmup_s: float = 0.0) -> float:
    """Shortest of ``repeats`` timed calls, after at least one call (or ``warmup_s``
    seconds of calls) to let caches, page tables and the CPU clock settle."""
    fn()
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_machine(
    device: str = "cpu", dtype: str = "float32", threads: int | None = None
) -> MachinePeaks:
    """Streaming read bandwidth (sum over 1 GiB) and square-matmul FLOP/s, best of runs."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    tdtype = getattr(torch, dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    n = (1 << 30) // 4 if dev.type == "cpu" else (4 << 30) // 4
    buffers = [torch.ones(n, dtype=torch.float32, device=dev)]

    def read() -> None:
        buffers[0].sum()
        sync()

    bw = n * 4 / _best_of(read, 5) / 1e9
    buffers.clear()
    size = 1536 if dev.type == "cpu" else 8192
    a = torch.randn(size, size, device=dev).to(tdtype)
    b = torch.randn(size, size, device=dev).to(tdtype)

    c = torch.empty(size, size, device=dev, dtype=tdtype)

    def mm() -> None:
        torch.matmul(a, b, out=c)  # into a preallocated output: no allocator in the timing
        sync()

    flops = 2 * size**3 / _best_of(mm, 10, warmup_s=0.5) / 1e9
    return MachinePeaks(device, dtype, torch.get_num_threads(), bw, flops)


def run(args: argparse.Namespace) -> int:
    from pagellm.engine.arg_utils import EngineArgs

    config = EngineArgs.from_cli_args(args).create_engine_config()
    mc = config.model
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[mc.dtype]
    costs = model_costs(mc.hf_config, dtype_bytes)
    peaks = measure_machine(config.device.device, mc.dtype, config.device.num_threads)
    ctx = args.context
    rows: list[tuple[str, Any]] = [
        ("Model", mc.served_model_name),
        ("Device / dtype / threads", f"{peaks.device} / {peaks.dtype} / {peaks.threads}"),
        ("Weight bytes per step", f"{costs.weight_bytes / 1e6:.1f} MB"),
        ("KV bytes per token of context", f"{costs.kv_bytes_per_token / 1e3:.1f} kB"),
        ("Matmul FLOPs per token", f"{2 * costs.matmul_params / 1e9:.3f} GFLOP"),
        ("Measured read bandwidth", f"{peaks.read_bandwidth_gbs:.1f} GB/s"),
        ("Measured matmul peak", f"{peaks.matmul_gflops:.1f} GFLOP/s"),
    ]
    for batch in args.batch_sizes:
        best = costs.best_step_time(peaks, batch, ctx)
        rows.append((f"Best decode, batch {batch}, ctx {ctx}", f"{batch / best:.1f} tok/s"))
    print_table("Roofline", rows)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(
                {
                    "costs": asdict(costs),
                    "peaks": asdict(peaks),
                    "machine": machine_info(),
                    "date": time.strftime("%Y-%m-%d"),
                },
                f,
                indent=2,
            )
    return 0


def add_parser(sub: Any) -> None:
    from pagellm.engine.arg_utils import EngineArgs

    p = sub.add_parser("roofline", help="model bytes/FLOPs per token and this machine's best tok/s")
    p.add_argument("--context", type=int, default=256, help="context length for the KV term")
    p.add_argument(
        "--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64]
    )
    p.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(p)
    p.set_defaults(handler=run)
