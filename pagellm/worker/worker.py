"""One worker of an engine: a rank of the torch.distributed group and its model runner.

An executor (pagellm.executor) starts the workers, in the engine's own process (uni),
in local processes (mp) or as Ray actors (ray), and calls the same methods on each of
them with the same arguments; every worker keeps the same per-request state from the
scheduler's deltas, so a step message is one ``SchedulerOutput`` (no tensors). Only the
output rank (TP rank 0 of the last pipeline stage) sends its ``ModelRunnerOutput`` back.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from pagellm.config import EngineConfig
from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagellm.distributed import parallel_state
from pagellm.lora.request import LoRARequest
from pagellm.worker.kv_cache import KVCachePlan

logger = logging.getLogger(__name__)


def pin_to_cores(cores: list[int] | None) -> None:
    """Bind this process (and so the OpenMP threads it starts later) to ``cores``."""
    if not cores:
        return
    try:
        os.sched_setaffinity(0, cores)
    except (AttributeError, OSError) as e:  # not Linux, or cores outside the cgroup
        logger.warning("cannot pin the worker to cores %s: %s", cores, e)


def split_cores(available: list[int], world_size: int, per_worker: int | None) -> list[list[int]]:
    """Disjoint core lists for the workers of one machine: ``per_worker`` each (default:
    an even share, at least one); workers past the cores share them round-robin."""
    n = per_worker or max(len(available) // world_size, 1)
    out = []
    for rank in range(world_size):
        start = (rank * n) % max(len(available), 1)
        cores = (available[start:] + available[:start])[:n]
        out.append(sorted(cores))
    return out


class Worker:
    def __init__(
        self,
        config: EngineConfig,
        rank: int,
        init_method: str | None,
        cores: list[int] | None = None,
    ) -> None:
        pin_to_cores(cores)
        import torch

        from pagellm.worker.model_runner import ModelRunner

        pc = config.parallel
        self.rank = rank
        if pc.world_size > 1:
            assert init_method is not None
            backend = "nccl" if config.device.device == "cuda" else "gloo"
            if config.device.device == "cuda":
                torch.cuda.set_device(rank % max(torch.cuda.device_count(), 1))
            parallel_state.init_parallel(
                rank, pc.tensor_parallel_size, pc.pipeline_parallel_size, init_method, backend,
                pc.worker_timeout,
            )  # fmt: skip
        self.state = parallel_state.get_parallel_state()
        if cores and config.device.num_threads is None:
            # One thread per core of this worker (the runner sets num_threads otherwise).
            torch.set_num_threads(len(cores))
        self.runner = ModelRunner(config)
        self._busy = 0.0

    # ---- the calls an executor makes on every worker -----------------------------------

    def info(self) -> dict[str, Any]:
        import torch

        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "weight_bytes": self.runner.weight_bytes,
            "threads": torch.get_num_threads(),
            "cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [],
            "lora": self.runner.lora_manager is not None,
        }

    def plan_kv_cache(self) -> KVCachePlan:
        return self.runner.plan_kv_cache()

    def allocate_kv_cache(self, plan: KVCachePlan) -> KVCachePlan:
        return self.runner.allocate_kv_cache(plan)

    def kv_tier_entries(self) -> list[tuple[int, bytes]]:
        return self.runner.kv_tier_entries()

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput | None:
        start = time.perf_counter()
        out = self.runner.execute_model(sched)
        self._busy += time.perf_counter() - start
        return out if self.state.is_output_rank else None

    def load_lora(self, lora: LoRARequest) -> None:
        if self.runner.lora_manager is not None:
            self.runner.lora_manager.load(lora)

    def remove_lora(self, lora_id: int) -> bool:
        return self.runner.remove_lora(lora_id)

    def comm_stats(self, reset: bool = False) -> dict[str, float]:
        """Seconds in collectives and their count, and seconds inside execute_model
        (``busy``), since the last reset."""
        out = {**parallel_state.comm_stats(reset), "busy": self._busy}
        if reset:
            self._busy = 0.0
        return out

    def shutdown(self) -> None:
        if self.runner.kv_tier is not None:
            self.runner.kv_tier.close()  # a file tier: flushed, its lock released
        parallel_state.destroy_parallel()

    # ---- sleep mode ---------------------------------------------------------------------

    def sleep(self, level: int = 1) -> dict[str, Any]:
        """Free this worker's KV cache (and weights: see ModelRunner.sleep) and return
        what it freed, with this process's resident set before and after."""
        from pagellm.worker.sleep import release_memory, rss_bytes

        before = rss_bytes()
        freed = self.runner.sleep(level)
        release_memory(self.runner.device)
        return self._sleep_info(before, freed)

    def wake_up(self, tags: list[str] | None = None) -> dict[str, Any]:
        """Restore what ``tags`` names (none: everything); see ModelRunner.wake_up."""
        from pagellm.worker.sleep import release_memory, rss_bytes

        before = rss_bytes()
        restored = self.runner.wake_up(tags)
        release_memory(self.runner.device)  # the loader's temporaries
        return self._sleep_info(before, restored)

    def _sleep_info(self, rss_before: int, counts: dict[str, int]) -> dict[str, Any]:
        from pagellm.worker.sleep import rss_bytes

        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "asleep": self.runner.asleep_tags(),
            "rss_before": rss_before,
            "rss_after": rss_bytes(),
            **counts,
        }
