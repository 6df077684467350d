"""The mp executor: one spawned process per worker on this machine.

Each worker process joins the torch.distributed group (gloo on CPU, NCCL on CUDA) at a
TCP rendezvous on 127.0.0.1, pins itself to its share of this process's cores and
answers calls from a pipe: ``(method, args)`` in, ``("ok", result)`` or ``("error",
kind, message)`` out. The engine waits on every pipe and every process's sentinel at
once, so a worker that dies is seen at once (not at the next timeout), and one that
stays silent past ``worker_timeout`` counts as hung. A worker exits when its pipe
closes (the engine is gone) and, on Linux, is killed with its parent (PR_SET_PDEATHSIG),
so no worker outlives the engine.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
import traceback
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any

from pagellm.config import EngineConfig
from pagellm.executor import RECOVERABLE_CALLS, Executor, WorkerFailedError
from pagellm.utils import die_with_parent, get_open_port
from pagellm.worker.worker import split_cores

logger = logging.getLogger(__name__)


def worker_main(
    config: EngineConfig,
    rank: int,
    init_method: str,
    cores: list[int] | None,
    conn: Connection,
    log_level: int,
) -> None:
    """A worker process's main function (spawned: a fresh interpreter)."""
    die_with_parent()
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s worker{rank} %(name)s: %(message)s"
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine decides when workers stop
    from pagellm.worker.worker import Worker

    try:
        worker = Worker(config, rank, init_method, cores)
        conn.send(("ok", worker.info()))
    except BaseException as e:
        conn.send(("error", type(e).__name__, f"{e}\n{traceback.format_exc()}"))
        return
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            return  # the engine is gone
        if method == "shutdown":
            worker.shutdown()
            conn.send(("ok", None))
            return
        try:
            result = getattr(worker, method)(*args)
        except BaseException as e:
            tb = traceback.format_exc()
            try:
                conn.send(("error", type(e).__name__, f"{e}\n{tb}" if method not in
                           RECOVERABLE_CALLS else str(e)))  # fmt: skip
            except (BrokenPipeError, OSError):
                return
            if method not in RECOVERABLE_CALLS:
                return  # the group is out of step: this worker is done
            continue
        try:
            conn.send(("ok", result))
        except (BrokenPipeError, OSError):
            return


def _context() -> Any:
    """Workers are forked from a fork server that has imported torch and pagellm once
    (per engine process): a worker starts in about a second instead of re-importing
    everything, as a spawned one would. The server itself is a fresh interpreter (no
    threads, no CUDA), which keeps forking safe."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "pagellm.worker.worker", "pagellm.worker.model_runner"])
    return ctx


class MPExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        pc = config.parallel
        ctx = _context()
        available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        cores = (
            split_cores(available, self.world_size, pc.cpus_per_worker)
            if available and config.device.device == "cpu"
            else [None] * self.world_size
        )
        init_method = f"tcp://127.0.0.1:{get_open_port()}"
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        self._closed = False
        level = logging.getLogger("pagellm").getEffectiveLevel()
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main,
                args=(config, rank, init_method, cores[rank], child, level),
                name=f"pagellm-worker-{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self._finalizer = weakref.finalize(self, _kill, list(self.procs))
        try:
            self.infos = self._gather("start-up", pc.worker_timeout + 300)
        except BaseException:
            self.shutdown()
            raise
        logger.info(
            "mp executor: %d workers (tp=%d, pp=%d), pids %s, cores %s",
            self.world_size, pc.tensor_parallel_size, pc.pipeline_parallel_size,
            [i["pid"] for i in self.infos], [i["cores"] for i in self.infos],
        )  # fmt: skip

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        if self._closed:
            raise WorkerFailedError("the workers have been shut down")
        for rank, conn in enumerate(self.conns):
            try:
                conn.send((method, args))
            except (BrokenPipeError, OSError):
                self._fail(f"worker {rank} is gone ({self._exit_of(rank)})")
        return self._gather(method, self.config.parallel.worker_timeout)

    def _gather(self, what: str, timeout: float) -> list[Any]:
        results: dict[int, Any] = {}
        errors: list[tuple[int, str, str]] = []
        deadline = time.monotonic() + timeout
        pending = {conn: rank for rank, conn in enumerate(self.conns)}
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.procs)}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                ranks = sorted(pending.values())
                self._fail(
                    f"worker(s) {ranks} did not answer {what!r} in "
                    f"{timeout:.0f} s (worker_timeout): hung"
                )
            ready = wait([*pending, *sentinels], timeout=left)
            for obj in ready:
                if obj in pending:
                    rank = pending.pop(obj)  # type: ignore[call-overload]
                    try:
                        reply = obj.recv()  # type: ignore[union-attr]
                    except (EOFError, OSError):
                        self._fail(f"worker {rank} died during {what!r} ({self._exit_of(rank)})")
                    if reply[0] == "ok":
                        results[rank] = reply[1]
                    else:
                        errors.append((rank, reply[1], reply[2]))
            for obj in ready:
                dead = sentinels.get(obj)  # type: ignore[call-overload]
                if dead is not None and self.conns[dead] in pending:
                    # Exited without answering (its last words may still be in the pipe).
                    if self.conns[dead].poll(0.2):
                        continue
                    self._fail(f"worker {dead} died during {what!r} ({self._exit_of(dead)})")
            if errors and what not in RECOVERABLE_CALLS:
                # A failed collective step leaves the others waiting in it: give up now.
                rank, kind, msg = errors[0]
                if what == "start-up" and kind == "ValueError":
                    # A model or option this rank cannot take: a configuration error,
                    # told as one (the first line; the traceback is the worker's own).
                    self.shutdown()
                    raise ValueError(msg.splitlines()[0])
                self._fail(f"worker {rank} failed in {what!r}: {kind}: {msg}")
        if errors:
            rank, kind, msg = errors[0]
            raise RuntimeError(f"{kind}: {msg}")
        return [results[r] for r in range(self.world_size)]

    def _exit_of(self, rank: int) -> str:
        proc = self.procs[rank]
        proc.join(0.5)
        code = proc.exitcode
        if code is None:
            return "still running"
        if code < 0:
            return f"killed by signal {-code}"
        return f"exit status {code}"

    def _fail(self, reason: str) -> None:
        logger.error("mp executor: %s", reason)
        self.shutdown()
        raise WorkerFailedError(reason)

    def check_health(self) -> None:
        for rank, proc in enumerate(self.procs):
            if not proc.is_alive():
                self._fail(f"worker {rank} is gone ({self._exit_of(rank)})")

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in self.conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(("shutdown", ()))
        deadline = time.monotonic() + 5
        for proc in self.procs:
            proc.join(max(deadline - time.monotonic(), 0.1))
        _kill(self.procs)
        for conn in self.conns:
            conn.close()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


def _kill(procs: list[Any]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
