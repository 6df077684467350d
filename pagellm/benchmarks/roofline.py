"""The roofline: what this machine and this model allow at best.

A decode step of batch B at context length L must read every weight once plus each
sequence's KV, and do 2 FLOPs per weight per token plus attention:

    bytes(B, L) = weight_bytes + B * L * kv_bytes_per_token
    flops(B, L) = B * (2 * matmul_params + 4 * layers * q_heads * head_dim * L)
    best step   = max(bytes / bandwidth, flops / peak_flops)

``pagellm bench roofline`` prints the model's side and the machine's measured peaks
(streaming read bandwidth and dense matmul FLOP/s in the run dtype); ``bench latency``
reports each measured step as a share of this bound.

The bandwidth is the best of several ways of reading memory (torch's multi-threaded sum,
pagellm's own wide-vector read kernel of every instruction set the CPU runs), each over
buffers of more than one size, all far above the last-level cache; the matmul peak is the
best of torch's BLAS and pagellm's own kernels. A roofline that some engine beats would
overstate every share measured against it. The probe runs in its own
process, so the process being benchmarked (pagellm, or transformers as the baseline)
never ran it.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pagellm.benchmarks.report import machine_info, print_table


@dataclass
class MachinePeaks:
    device: str
    dtype: str
    threads: int
    read_bandwidth_gbs: float
    matmul_gflops: float
    bandwidth_by_method: dict[str, float] = field(default_factory=dict)
    """GB/s of each read method and buffer size; read_bandwidth_gbs is the best of them."""
    matmul_by_method: dict[str, float] = field(default_factory=dict)
    """GFLOP/s of each matmul (torch's BLAS, pagellm's kernels); matmul_gflops is the best."""
    compute_peaks: dict[str, float] = field(default_factory=dict)
    """The vector units' arithmetic peak, all threads, operands in registers: G ops/s of
    "fp32" (FMA), "bf16" (vdpbf16ps pair dots) and "int8" (u8 x s8 dots, 2 ops per
    multiply-add). Empty on a GPU or where the kernels are not built."""

    def compute_gflops(self, kind: str) -> float:
        """The compute bound of matmuls run on ``kind`` units: the instruction peak where it
        was measured (bf16 without its dot instruction runs at the fp32 rate, converted),
        else the best measured matmul."""
        peak = self.compute_peaks.get(kind) or self.compute_peaks.get("fp32")
        return max(peak or 0.0, self.matmul_gflops)


@dataclass
class ModelCosts:
    num_layers: int
    num_q_heads: int
    head_dim: int
    weight_bytes: int
    matmul_params: int
    lm_head_params: int
    kv_bytes_per_token: int
    compute: str = "fp32"
    """The units the matmuls run on (a key of MachinePeaks.compute_peaks)."""

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
        """The tighter of the two bounds: every byte at the read bandwidth, or every FLOP
        at the arithmetic peak of the units the matmuls run on."""
        return max(
            self.decode_bytes(batch, context) / (peaks.read_bandwidth_gbs * 1e9),
            self.decode_flops(batch, context) / (peaks.compute_gflops(self.compute) * 1e9),
        )

    def best_prefill_time(self, peaks: MachinePeaks, batch: int, prompt_len: int) -> float:
        return self.prefill_flops(batch, prompt_len) / (peaks.compute_gflops(self.compute) * 1e9)

    def bound(self, peaks: MachinePeaks, batch: int, context: int) -> str:
        """Which bound is the tighter one at this batch and context."""
        mem = self.decode_bytes(batch, context) / peaks.read_bandwidth_gbs
        comp = self.decode_flops(batch, context) / peaks.compute_gflops(self.compute)
        return "memory" if mem >= comp else "compute"


def model_costs(
    hf_config: Any,
    dtype_bytes: int,
    weight_bytes: int | None = None,
    kv_bytes_per_token: int | None = None,
    compute: str = "fp32",
) -> ModelCosts:
    """Bytes and FLOPs of a Llama-family model from its config; ``weight_bytes`` and
    ``kv_bytes_per_token`` override the dtype-based sizes with what a loaded engine
    measured (quantized weights, a quantized KV cache)."""
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
        weight_bytes=weight_bytes or (matmul_params + norms) * dtype_bytes,
        matmul_params=matmul_params,
        lm_head_params=vocab * h,
        kv_bytes_per_token=kv_bytes_per_token or layers * 2 * kv_heads * d * dtype_bytes,
        compute=compute,
    )


def compute_kind(config: Any) -> str:
    """The units a loaded engine's matmuls run on: int8 dots for weights kept quantized on
    pagellm's CPU kernels (activations are quantized to int8 per row), else the dtype's."""
    from pagellm.layers import native

    mc = config.model
    on_kernels = config.device.device == "cpu" and native.loaded()
    if mc.quantization.method != "none" and on_kernels:
        return "int8"
    if mc.dtype == "bfloat16" and on_kernels:
        lib = native.load()  # bf16 weights widened to float32 run on the FMA units
        return "bf16" if lib is not None and lib.pagellm_has_bf16_dot() else "fp32"
    return {"bfloat16": "bf16", "float16": "fp16"}.get(mc.dtype, "fp32")


# (kind, index of the kind in pagellm_peak_ops)
_PEAK_KINDS = (("fp32", 0), ("int8", 1), ("bf16", 2))


def measure_compute_peaks(threads: int) -> dict[str, float]:
    """G ops/s of each vector unit over all ``threads``, best ISA build and best of 5."""
    from pagellm.layers import native

    peaks: dict[str, float] = {}
    for isa in native.supported_isas():
        lib = native.load(isa)
        if lib is None:
            continue
        for kind, index in _PEAK_KINDS:
            if lib.pagellm_peak_ops(index, 1, threads) == 0.0:
                continue  # this build lacks the instruction
            iters = 1 << 16
            while True:  # about 50 ms per timed call
                start = time.perf_counter()
                lib.pagellm_peak_ops(index, iters, threads)
                if time.perf_counter() - start > 0.05 or iters > 1 << 30:
                    break
                iters *= 2
            rate = native.peak_rate(lib, index, iters, threads, 5) / 1e9
            peaks[kind] = max(peaks.get(kind, 0.0), rate)
    return peaks


def step_weight_bytes(model: Any) -> int:
    """Weight bytes a decode step reads from a loaded model: everything but an untied
    embedding table, of which a step only gathers a few rows."""
    from pagellm.models.loader import model_weight_bytes

    total = model_weight_bytes(model)
    if getattr(model, "lm_head", None) is not None:
        total -= model_weight_bytes(model.model.embed_tokens)
    return total


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


def _llc_bytes() -> int:
    """Size of the largest CPU cache (32 MiB when it cannot be read)."""
    import glob

    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 << 20


def measure_bandwidth(device: str = "cpu") -> dict[str, float]:
    """GB/s of every read method over buffers of several sizes above the last-level cache."""
    import torch

    dev = torch.device(device)
    results: dict[str, float] = {}
    if dev.type == "cuda":
        sizes = [1 << 30, 4 << 30]
    else:
        sizes = sorted({max(8 * _llc_bytes(), 256 << 20), 1 << 30})
    for size in sizes:
        buf = torch.ones(size // 4, dtype=torch.float32, device=dev)
        label = f"{size >> 20}MiB"

        def torch_sum(buf: torch.Tensor = buf) -> None:
            buf.sum()
            if dev.type == "cuda":
                torch.cuda.synchronize()

        results[f"torch.sum/{label}"] = size / _best_of(torch_sum, 5) / 1e9
        if dev.type == "cpu":
            from pagellm.layers import native

            for isa in native.supported_isas():
                lib = native.load(isa)
                if lib is None:
                    continue

                def native_read(lib: Any = lib, buf: torch.Tensor = buf) -> None:
                    lib.pagellm_read_sum(buf.data_ptr(), buf.numel(), torch.get_num_threads())

                results[f"pagellm_read_{isa}/{label}"] = size / _best_of(native_read, 5) / 1e9
        del buf
    return results


def measure_machine(
    device: str = "cpu", dtype: str = "float32", threads: int | None = None
) -> MachinePeaks:
    """Best streaming read bandwidth and square-matmul FLOP/s, in this process."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    tdtype = getattr(torch, dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    by_method = measure_bandwidth(device)
    matmul: dict[str, float] = {}
    size = 1536 if dev.type == "cpu" else 8192
    a = torch.randn(size, size, device=dev).to(tdtype)
    b = torch.randn(size, size, device=dev).to(tdtype)
    c = torch.empty(size, size, device=dev, dtype=tdtype)

    def mm() -> None:
        torch.matmul(a, b, out=c)  # into a preallocated output: no allocator in the timing
        sync()

    matmul[f"torch.matmul/{size}"] = 2 * size**3 / _best_of(mm, 10, warmup_s=0.5) / 1e9
    if dev.type == "cpu" and tdtype == torch.float32:
        from pagellm.layers import native

        x = torch.randn(256, size)
        for isa in native.supported_isas():
            lib = native.load(isa)
            if lib is None:
                continue

            def native_mm(lib: Any = lib) -> None:
                lib.pagellm_linear_f32(
                    x.data_ptr(), size, a.data_ptr(), None, c.data_ptr(), 256, size, size,
                    torch.get_num_threads(),
                )  # fmt: skip

            rate = 2 * 256 * size * size / _best_of(native_mm, 10, warmup_s=0.5) / 1e9
            matmul[f"pagellm_linear_{isa}/256x{size}"] = rate
            # The quantized kernels (int8 dot products) can outrun any fp32 matmul: the
            # peak of a quantized model's steps includes them.
            matmul[f"pagellm_qlinear_u4_{isa}/256x{size}"] = _qlinear_rate(lib, x, size)
    compute = measure_compute_peaks(torch.get_num_threads()) if dev.type == "cpu" else {}
    return MachinePeaks(
        device, dtype, torch.get_num_threads(), max(by_method.values()), max(matmul.values()),
        by_method, matmul, compute,
    )  # fmt: skip


def _qlinear_rate(lib: Any, x: Any, size: int) -> float:
    """GFLOP/s (2 per multiply-add) of the 4-bit quantized kernel on a [size, size] matrix."""
    import numpy as np
    import torch

    from pagellm.layers.quantization.packed import BlockCodes, PackedWeight

    rng = np.random.default_rng(0)
    bc = BlockCodes(
        rng.integers(0, 16, (size, size)).astype(np.uint8),
        np.full((size, size // 32), 0.01, np.float32),
        np.full((size, size // 32), -0.08, np.float32),
        "u4",
    )
    w = PackedWeight(bc, lib)
    y = torch.empty(x.shape[0], size)
    seconds = _best_of(lambda: w(x, y), 10, warmup_s=0.5)
    return float(2 * x.shape[0] * size * size / seconds / 1e9)


def measure_machine_isolated(
    device: str = "cpu", dtype: str = "float32", threads: int | None = None
) -> MachinePeaks:
    """measure_machine() in a child process: the caller's process (the engine being
    benchmarked) never runs the probe, its kernels or its allocations."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pagellm.benchmarks.roofline", device, dtype, str(threads or 0)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the roofline probe failed:\n{proc.stderr[-2000:]}")
    return MachinePeaks(**json.loads(proc.stdout.strip().splitlines()[-1]))


def run(args: argparse.Namespace) -> int:
    from pagellm.engine.arg_utils import EngineArgs
    from pagellm.engine.llm_engine import LLMEngine

    # Load the engine for what it stores (quantized weights, KV dtype); the machine is
    # probed in a child process all the same.
    engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
    config = engine.config
    mc = config.model
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[mc.dtype]
    costs = model_costs(
        mc.hf_config, dtype_bytes, step_weight_bytes(engine.core.runner.model),
        round(engine.plan.kv_bytes_per_context_token), compute_kind(config),
    )  # fmt: skip
    peaks = measure_machine_isolated(config.device.device, mc.dtype, config.device.num_threads)
    ctx = args.context
    rows: list[tuple[str, Any]] = [
        ("Model", mc.served_model_name),
        ("Device / dtype / threads", f"{peaks.device} / {peaks.dtype} / {peaks.threads}"),
        ("Weight bytes per step", f"{costs.weight_bytes / 1e6:.1f} MB"),
        ("KV bytes per token of context", f"{costs.kv_bytes_per_token / 1e3:.1f} kB"),
        ("Matmul FLOPs per token", f"{2 * costs.matmul_params / 1e9:.3f} GFLOP"),
        *(
            (f"  read: {name}", f"{gbs:.1f} GB/s")
            for name, gbs in peaks.bandwidth_by_method.items()
        ),
        ("Measured read bandwidth (best)", f"{peaks.read_bandwidth_gbs:.1f} GB/s"),
        *((f"  matmul: {name}", f"{g:.1f} GFLOP/s") for name, g in peaks.matmul_by_method.items()),
        ("Measured matmul peak (best)", f"{peaks.matmul_gflops:.1f} GFLOP/s"),
        *((f"  peak: {kind}", f"{g:.1f} G ops/s") for kind, g in peaks.compute_peaks.items()),
        (
            "Compute bound used (matmuls on)",
            f"{costs.compute}: {peaks.compute_gflops(costs.compute):.1f} G ops/s",
        ),
    ]
    for batch in args.batch_sizes:
        best = costs.best_step_time(peaks, batch, ctx)
        rows.append(
            (
                f"Best decode, batch {batch}, ctx {ctx}",
                f"{batch / best:.1f} tok/s ({costs.bound(peaks, batch, ctx)} bound)",
            )
        )
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


if (
    __name__ == "__main__"
):  # the isolated probe: python -m pagellm.benchmarks.roofline DEV DTYPE THREADS
    import sys

    _dev, _dtype, _threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps(asdict(measure_machine(_dev, _dtype, _threads or None))))
