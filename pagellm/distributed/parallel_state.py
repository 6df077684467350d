"""Where this process sits among the workers of one engine, and the collectives it uses.

    rank = pp_rank * tp_size + tp_rank        (vLLM's layout: a stage's TP ranks adjacent)

    stage 0: ranks 0 .. tp-1   -- hidden states -->   stage 1: ranks tp .. 2tp-1   ...

Every collective goes through torch.distributed (gloo on CPU, NCCL on CUDA): the
all-reduce after each row-parallel linear and the vocab-parallel embedding, the
all-gather of the vocab-parallel logits, and the point-to-point send/recv of hidden
states between pipeline stages. A process that never called ``init_parallel`` is the one
worker of a one-process engine (tp = pp = 1): every collective is then the identity, so
the model code needs no branch for it.

The time spent inside collectives is counted (``comm_stats``): the per-step host cost
the executors are measured by (docs/parallel.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch


@dataclass(frozen=True)
class ParallelState:
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    tp_group: Any = None
    """The torch.distributed group of this stage's TP ranks (None when tp_size == 1)."""

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_output_rank(self) -> bool:
        """The rank whose step result goes back to the engine core: TP rank 0 of the
        last stage (every TP rank of it has the same logits and samples alike)."""
        return self.is_last_stage and self.tp_rank == 0

    def stage_rank(self, pp_rank: int) -> int:
        """This TP rank's peer in stage ``pp_rank``."""
        return pp_rank * self.tp_size + self.tp_rank


_STATE = ParallelState()
_COMM = {"seconds": 0.0, "calls": 0}


def get_parallel_state() -> ParallelState:
    return _STATE


def init_parallel(
    rank: int,
    tp_size: int,
    pp_size: int,
    init_method: str,
    backend: str,
    timeout_s: float = 600.0,
) -> ParallelState:
    """Join the process group of ``tp_size * pp_size`` workers (blocks until all have)."""
    import torch.distributed as dist

    global _STATE
    world = tp_size * pp_size
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )  # fmt: skip
    tp_group = None
    for stage in range(pp_size):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)))
        if stage == rank // tp_size:
            tp_group = group
    _STATE = ParallelState(tp_size, rank % tp_size, pp_size, rank // tp_size, tp_group)
    return _STATE


def destroy_parallel() -> None:
    import torch.distributed as dist

    global _STATE
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE = ParallelState()


def comm_stats(reset: bool = False) -> dict[str, float]:
    """Seconds spent in collectives and their count since the last reset."""
    out = dict(_COMM)
    if reset:
        _COMM["seconds"], _COMM["calls"] = 0.0, 0
    return out


def _timed(start: float) -> None:
    _COMM["seconds"] += time.perf_counter() - start
    _COMM["calls"] += 1


SMALL_ALL_REDUCE = 16384
"""Elements up to which a gloo all-reduce is done as blocking pairwise exchanges: gloo's
all-reduce (and its async send/recv) cost ~1.8 ms on a 2-core VM whatever the size,
a blocking send/recv round trip 0.24 ms (docs/parallel.md). A decode step's
activations ([batch, hidden]) are small; prefill's go through gloo's all-reduce."""


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over this stage's TP ranks (in place where it can)."""
    s = _STATE
    if s.tp_size == 1:
        return x
    import torch.distributed as dist

    start = time.perf_counter()
    x = x.contiguous()
    if x.numel() <= SMALL_ALL_REDUCE and x.device.type == "cpu":
        x = _exchange_sum(x)
    else:
        dist.all_reduce(x, group=s.tp_group)
    _timed(start)
    return x


def _exchange_sum(x: torch.Tensor) -> torch.Tensor:
    """Every TP rank sends ``x`` to every other with blocking send/recv, pairs taken in
    one global order (no cycle, so no deadlock), and sums the parts in rank order: the
    same bits on every rank."""
    import torch.distributed as dist

    s = _STATE
    base = s.pp_rank * s.tp_size
    parts: list[torch.Tensor] = []
    for r in range(s.tp_size):
        if r == s.tp_rank:
            parts.append(x)
            continue
        buf = torch.empty_like(x)
        if s.tp_rank < r:
            dist.send(x, base + r)
            dist.recv(buf, base + r)
        else:
            dist.recv(buf, base + r)
            dist.send(x, base + r)
        parts.append(buf)
    out = parts[0].clone()
    for p in parts[1:]:
        out += p
    return out


def tp_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [M, n] of every TP rank along the last dimension (rank order)."""
    s = _STATE
    if s.tp_size == 1:
        return x
    import torch.distributed as dist

    start = time.perf_counter()
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(s.tp_size)]
    dist.all_gather(parts, x, group=s.tp_group)
    _timed(start)
    return torch.cat(parts, dim=-1)


def pp_send(x: torch.Tensor, to_stage: int) -> Any:
    """Start sending hidden states to this TP rank's peer of stage ``to_stage``; the
    caller waits on the returned work before reusing ``x``."""
    import torch.distributed as dist

    start = time.perf_counter()
    work = dist.isend(x.contiguous(), _STATE.stage_rank(to_stage))
    _timed(start)
    return work


def pp_recv(
    shape: tuple[int, ...], dtype: torch.dtype, device: Any, from_stage: int
) -> torch.Tensor:
    import torch.distributed as dist

    start = time.perf_counter()
    out = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(out, _STATE.stage_rank(from_stage))
    _timed(start)
    return out


def tp_partition(total: int, what: str) -> tuple[int, int]:
    """(start, size) of this TP rank's equal share of ``total`` (heads, columns)."""
    s = _STATE
    if total % s.tp_size:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size {s.tp_size}")
    size = total // s.tp_size
    return s.tp_rank * size, size


def kv_head_partition(num_kv_heads: int) -> tuple[int, int]:
    """(first KV head, KV heads) of this TP rank: an equal share, or, when there are
    fewer KV heads than ranks, the one head its query heads read (replicated)."""
    s = _STATE
    if num_kv_heads >= s.tp_size:
        return tp_partition(num_kv_heads, "num_key_value_heads")
    return s.tp_rank * num_kv_heads // s.tp_size, 1


def pp_layer_range(num_layers: int) -> range:
    """The decoder layers of this pipeline stage: equal shares, the earlier stages one
    more when they do not divide (vLLM gives the remainder to the last stages; either
    works, the KV memory plan takes the smallest stage's blocks)."""
    s = _STATE
    base, extra = divmod(num_layers, s.pp_size)
    start = s.pp_rank * base + min(s.pp_rank, extra)
    return range(start, start + base + (1 if s.pp_rank < extra else 0))


def check_parallel_shapes(hf_config: Any, tp_size: int, pp_size: int) -> None:
    """Refuse sizes the model's shapes cannot split, naming them (before any worker starts)."""
    heads = int(hf_config.num_attention_heads)
    kv = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    if tp_size > 1 and (heads % tp_size or (kv % tp_size and tp_size % kv)):
        ok = [n for n in range(1, heads + 1) if heads % n == 0 and (kv % n == 0 or n % kv == 0)]
        raise ValueError(
            f"tensor_parallel_size {tp_size} does not divide this model's attention heads: it "
            f"has {heads} attention heads and {kv} KV heads (the attention heads must divide "
            f"evenly, and the KV heads divide or are replicated). Valid sizes: "
            f"{', '.join(map(str, ok))}; or use --pipeline-parallel-size, which splits layers"
        )
    layers = int(hf_config.num_hidden_layers)
    if pp_size > layers:
        raise ValueError(
            f"pipeline_parallel_size {pp_size} is more than the model's {layers} layers"
        )
