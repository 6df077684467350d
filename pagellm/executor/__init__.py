"""Executors: the seam between the engine core and the workers (vLLM's design).

    EngineCore (scheduler, KV manager)
        |  execute_model(SchedulerOutput)        one small message per step
        v
    Executor --- uni: the one Worker, in this process
             --- mp:  N worker processes (pipes; collectives over torch.distributed)
             --- ray: N Ray actors in a placement group (local Ray or RAY_ADDRESS)
        |
        v  one ModelRunnerOutput (from the output rank)

Every worker gets every call (``collective_rpc``); they run the step together (their
all-reduces and pipeline sends pair up inside torch.distributed) and the output rank's
result comes back. A worker that dies, fails or stays silent past ``worker_timeout``
raises ``WorkerFailedError`` in the engine core: the core's failure path then ends every
in-flight request with the error, /health turns 503 and the server exits non-zero
(pagellm.engine.core_client). ``shutdown`` ends the workers; none outlives the engine.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from typing import Any

from pagellm.config import EngineConfig
from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagellm.lora.request import LoRARequest
from pagellm.worker.kv_cache import KVCachePlan

logger = logging.getLogger(__name__)


class WorkerFailedError(RuntimeError):
    """A worker died, raised in a step or hung: the engine cannot go on."""


# Calls whose exception leaves the workers in step (nothing collective ran): it is
# raised as the worker's own error instead of failing the engine. A sleep or wake_up
# that fails on some rank leaves the engine asleep; both are idempotent, so the next
# wake_up brings every rank back to the same state.
RECOVERABLE_CALLS = frozenset({"load_lora", "remove_lora", "sleep", "wake_up"})


class Executor(abc.ABC):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.world_size = config.parallel.world_size
        self.infos: list[dict[str, Any]] = []

    @staticmethod
    def create(config: EngineConfig) -> Executor:
        backend = config.parallel.distributed_executor_backend
        if backend == "uni":
            return UniExecutor(config)
        if backend == "mp":
            from pagellm.executor.mp import MPExecutor

            return MPExecutor(config)
        if backend == "ray":
            from pagellm.executor.ray import RayExecutor

            return RayExecutor(config)
        raise ValueError(f"unknown distributed_executor_backend {backend!r}")

    @abc.abstractmethod
    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Call ``method`` on every worker with the same arguments; results in rank order."""

    @property
    def output_rank(self) -> int:
        pc = self.config.parallel
        return (pc.pipeline_parallel_size - 1) * pc.tensor_parallel_size

    @property
    def weight_bytes(self) -> int:
        """Weight bytes of the output rank's shard (a rank's share of the model)."""
        return int(self.infos[self.output_rank]["weight_bytes"]) if self.infos else 0

    @property
    def lora_enabled(self) -> bool:
        return self.config.lora is not None

    def initialize_kv_cache(self) -> KVCachePlan:
        """Each worker plans from its budget; all allocate the fewest blocks any can hold
        (the scheduler's block ids address every worker's cache)."""
        plans: list[KVCachePlan] = self.collective_rpc("plan_kv_cache")
        fewest = min(plans, key=lambda p: p.num_blocks)
        fewest = dataclasses.replace(
            fewest, num_tier_slots=min(p.num_tier_slots for p in plans)
        )  # a stage with more layers has bigger blocks: every tier holds the same slots
        plans = self.collective_rpc("allocate_kv_cache", fewest)
        return plans[self.output_rank]

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        out = self.collective_rpc("execute_model", sched)[self.output_rank]
        assert out is not None
        return out  # type: ignore[no-any-return]

    def load_lora(self, lora: LoRARequest) -> None:
        """Read an adapter on every worker; an adapter that cannot be read raises the
        worker's error (only its request fails, the workers go on)."""
        self.collective_rpc("load_lora", lora)

    def remove_lora(self, lora_id: int) -> None:
        self.collective_rpc("remove_lora", lora_id)

    def sleep(self, level: int) -> list[dict[str, Any]]:
        """Every worker frees its KV cache (and weights, level 2); their reports in rank
        order (pid, resident bytes before and after, bytes freed)."""
        return self.collective_rpc("sleep", level)

    def wake_up(self, tags: list[str] | None = None) -> list[dict[str, Any]]:
        """Every worker restores what ``tags`` names (none: everything)."""
        return self.collective_rpc("wake_up", tags)

    def comm_stats(self, reset: bool = False) -> list[dict[str, float]]:
        """Seconds in collectives and their count per worker (since the last reset)."""
        return self.collective_rpc("comm_stats", reset)

    def check_health(self) -> None:  # noqa: B027 (the uni worker has nothing to check)
        """Raise WorkerFailedError if a worker is gone."""

    def shutdown(self) -> None:  # noqa: B027
        """End the workers (idempotent)."""


class UniExecutor(Executor):
    """The one worker in the engine's own process (no torch.distributed)."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        from pagellm.worker.worker import Worker

        self.worker = Worker(config, 0, None)
        self.infos = [self.worker.info()]

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args)]

    def shutdown(self) -> None:
        tier = self.worker.runner.kv_tier
        if tier is not None:
            tier.close()
