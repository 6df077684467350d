"""The ray executor: the workers are Ray actors in one placement group.

    ray.init()            a local Ray (this machine), or the cluster at RAY_ADDRESS
    placement group       one bundle per worker ({"CPU": cpus_per_worker} or {"GPU": 1}),
                          PACK: on as few nodes as fit
    actors                RayWorker, one per bundle; actor 0's node hosts the
                          torch.distributed rendezvous (gloo/NCCL across nodes)

Calls go to every actor at once (``ray.get`` over their futures, bounded by
``worker_timeout``); an actor that dies raises RayActorError, which becomes
WorkerFailedError. ``shutdown`` kills the actors and removes the placement group; a Ray
that this executor started is shut down with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any
from urllib.parse import urlparse

from pagellm.config import EngineConfig
from pagellm.executor import RECOVERABLE_CALLS, Executor, WorkerFailedError
from pagellm.worker.worker import split_cores

logger = logging.getLogger(__name__)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ValueError(
            "distributed_executor_backend ray needs Ray: pip install 'pagellm[ray]'"
        ) from None
    return ray


def check_ray_address(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast (not after Ray's own long retries) when RAY_ADDRESS names a host:port
    that does not answer."""
    if not address or address in ("auto", "local"):
        return
    url = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = url.hostname, url.port or (10001 if url.scheme == "ray" else 6379)
    if not host:
        raise ValueError(f"RAY_ADDRESS {address!r} is not host:port")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as e:
        raise ValueError(
            f"the Ray cluster at RAY_ADDRESS={address!r} does not answer ({host}:{port}: {e}). "
            "Start it with `ray start --head` on the head node (and `ray start --address "
            "HEAD:6379` on the others), or unset RAY_ADDRESS for a local Ray"
        ) from None


class _RayWorker:
    """The actor: a Worker built on demand (after the rendezvous address is known)."""

    def __init__(self) -> None:
        self.worker: Any = None

    def node_info(self) -> dict[str, Any]:
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        return {"node": ray.get_runtime_context().get_node_id(), "ip": host, "port": port,
                "cores": cores}  # fmt: skip

    def start(
        self, config: EngineConfig, rank: int, init_method: str, cores: list[int] | None
    ) -> dict[str, Any]:
        from pagellm.worker.worker import Worker

        self.worker = Worker(config, rank, init_method, cores)
        return self.worker.info()  # type: ignore[no-any-return]

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        ray = self.ray = _import_ray()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._remove_pg = remove_placement_group
        pc = config.parallel
        self._started_ray = False
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            check_ray_address(address)
            ray.init(address=address or None, log_to_driver=True, include_dashboard=False)
            self._started_ray = True
        gpu = config.device.device == "cuda"
        cpus = pc.cpus_per_worker or 1
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": cpus}
        self.pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        self.actors: list[Any] = []
        self._closed = False
        try:
            ready, _ = ray.wait([self.pg.ready()], timeout=min(pc.worker_timeout, 60))
            if not ready:
                raise ValueError(
                    f"the Ray cluster cannot place {self.world_size} workers of {bundle} "
                    f"(it has {ray.cluster_resources()}); lower the parallel sizes or "
                    "--cpus-per-worker, or add nodes"
                )
            actor_cls = ray.remote(_RayWorker)
            for i in range(self.world_size):
                strategy = PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=i
                )
                self.actors.append(
                    actor_cls.options(
                        num_cpus=bundle["CPU"],
                        num_gpus=bundle.get("GPU", 0),
                        scheduling_strategy=strategy,
                    ).remote()
                )
            nodes = self._get([a.node_info.remote() for a in self.actors], "start-up")
            init_method = f"tcp://{nodes[0]['ip']}:{nodes[0]['port']}"
            cores = self._cores(nodes, cpus) if not gpu else [None] * self.world_size
            self.infos = self._get(
                [a.start.remote(config, r, init_method, cores[r]) for r, a in enumerate(self.actors)],
                "start-up",
            )  # fmt: skip
        except BaseException:
            self.shutdown()
            raise
        logger.info(
            "ray executor: %d workers (tp=%d, pp=%d) on %d node(s), rendezvous %s",
            self.world_size, pc.tensor_parallel_size, pc.pipeline_parallel_size,
            len({n["node"] for n in nodes}), init_method,
        )  # fmt: skip

    def _cores(self, nodes: list[dict[str, Any]], per_worker: int) -> list[list[int] | None]:
        """Disjoint cores for the workers of each node (Ray reserves CPUs, it does not pin)."""
        by_node: dict[str, list[int]] = {}
        for rank, n in enumerate(nodes):
            by_node.setdefault(n["node"], []).append(rank)
        out: list[list[int] | None] = [None] * len(nodes)
        for ranks in by_node.values():
            avail = nodes[ranks[0]]["cores"]
            if avail:
                for rank, cores in zip(ranks, split_cores(avail, len(ranks), per_worker)):
                    out[rank] = cores
        return out

    def _get(self, futures: list[Any], what: str) -> list[Any]:
        ray = self.ray
        try:
            return ray.get(futures, timeout=self.config.parallel.worker_timeout)  # type: ignore[no-any-return]
        except ray.exceptions.GetTimeoutError:
            self._fail(
                f"a worker did not answer {what!r} in {self.config.parallel.worker_timeout:.0f} s: hung"
            )
        except ray.exceptions.RayActorError as e:
            self._fail(f"a worker died during {what!r}: {e}")
        except ray.exceptions.RayTaskError as e:
            if what in RECOVERABLE_CALLS:
                raise RuntimeError(str(e.cause if e.cause is not None else e)) from None
            if what == "start-up" and isinstance(e.cause, ValueError):
                self.shutdown()  # a model or option a rank cannot take: a config error
                raise ValueError(str(e.cause)) from None
            self._fail(f"a worker failed in {what!r}: {e}")
        raise AssertionError("unreachable")

    def _fail(self, reason: str) -> None:
        logger.error("ray executor: %s", reason)
        self.shutdown()
        raise WorkerFailedError(reason)

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        if self._closed:
            raise WorkerFailedError("the workers have been shut down")
        return self._get([a.call.remote(method, *args) for a in self.actors], method)

    def check_health(self) -> None:
        if not self._closed:
            self._get([a.call.remote("comm_stats") for a in self.actors], "health check")

    def shutdown(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        ray = self.ray
        for actor in self.actors:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(actor)
        with contextlib.suppress(Exception):
            self._remove_pg(self.pg)
        if self._started_ray:
            ray.shutdown()
