"""The engine core in its own process, and the client the API process drives it with.

    API process (event loop, HTTP, tokenize,      engine core process
    detokenize, streams)                          (scheduler + model runner + KV)
    -----------------------------------------     ----------------------------------
    EngineCoreClient.send()  -> queue              run_engine_core():
      sender thread: batches the queue ------pipe--> drain commands (add / abort /
                                                     remove_lora / sleep / wake_up / stop)
                                                     step(); one message per step
      reader thread <-------------------------pipe-- ("step", outputs, stats, ...),
        -> on_message(...) (AsyncLLM hands        ("idle", ...), ("sleep_done" /
           it to the event loop)                  "wake_done", report, error)

The event loop never waits for a step (it only puts commands on a queue and receives
callbacks), and a step never waits for the event loop (its outputs go into a pipe whose
reader is a thread of its own). Messages are pickled, one per step in each direction at
most. If the engine process dies, the reader sees the pipe close and reports it once
(``on_dead``); a core that raises sends its traceback first, then exits with status 1.

The offline ``LLM`` keeps the core in its own process: a batch job has no event loop to
protect, and one process is simpler to debug and to embed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from pagellm.config import EngineConfig
from pagellm.utils import die_with_parent

if TYPE_CHECKING:
    from pagellm.engine.llm_engine import EngineCore

logger = logging.getLogger(__name__)

_STOP = ("stop",)


def run_engine_core(
    config: EngineConfig,
    commands: Connection,
    outputs: Connection,
    log_level: int,
    engine_index: int = 0,
    cores: list[int] | None = None,
) -> None:
    """The engine process's main function (spawned: a fresh interpreter). ``cores``: the
    CPU cores of this replica (data parallel), bound before torch starts its threads."""
    die_with_parent()
    tag = f" engine{engine_index}" if config.parallel.data_parallel_size > 1 else ""
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s{tag} %(name)s: %(message)s"
    )
    if cores:
        from pagellm.worker.worker import pin_to_cores

        pin_to_cores(cores)
        if config.device.num_threads is None and config.parallel.world_size == 1:
            import torch

            torch.set_num_threads(len(cores))
    from pagellm.engine.llm_engine import EngineCore

    try:
        core = EngineCore(config)
    except BaseException as e:  # start-up failed: tell the parent why
        outputs.send(("error", f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from None
    outputs.send(("ready", core.plan))
    drained = 0
    try:
        while True:
            idle = not core.has_unfinished_requests()
            # Idle: block until a command arrives (EOFError when the parent is gone),
            # checking every second that the workers are alive (a dead one fails the
            # engine now, not at the next request).
            if idle:
                while not commands.poll(1.0):
                    core.check_health()
            if idle or commands.poll():
                batch = commands.recv()
                while True:
                    for cmd in batch:
                        if cmd[0] == "add":
                            core.add_request(cmd[1])
                            drained += 1
                        elif cmd[0] == "abort":
                            core.abort_requests(cmd[1])
                        elif cmd[0] == "remove_lora":
                            core.remove_lora(cmd[1])
                        elif cmd[0] in ("sleep", "wake_up"):
                            outputs.send(_sleep_command(core, cmd))
                        elif cmd[0] == "stop":
                            return
                    if not commands.poll():
                        break
                    batch = commands.recv()
            if not core.has_unfinished_requests():
                outputs.send(("idle", core.stats(), drained, core.take_kv_events()))
                continue
            start = time.perf_counter()
            result = core.step()
            seconds = time.perf_counter() - start
            outputs.send(("step", result, core.stats(), drained, seconds, core.take_kv_events()))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the API process is gone (or asked us to stop)
    except BaseException:
        outputs.send(("error", traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        core.shutdown()  # its workers (mp, ray) end with it


def _sleep_command(
    core: EngineCore, cmd: tuple[Any, ...]
) -> tuple[str, dict[str, Any], str | None]:
    """Run ("sleep", level) or ("wake_up", tags) and build its reply: ("sleep_done" or
    "wake_done", report, error or None). An error the engine survives (a bad level, a
    checkpoint that cannot be read again) is reported, not raised; a dead worker still
    fails the engine."""
    from pagellm.executor import WorkerFailedError

    kind = "sleep_done" if cmd[0] == "sleep" else "wake_done"
    try:
        report = core.sleep(cmd[1]) if cmd[0] == "sleep" else core.wake_up(cmd[1])
    except WorkerFailedError:
        raise
    except Exception as e:
        logger.error("%s failed: %s: %s", cmd[0], type(e).__name__, e)
        report = {"asleep": sorted(core.asleep)}
        return kind, {**report, "is_sleeping": core.is_sleeping}, f"{type(e).__name__}: {e}"
    return kind, {**report, "is_sleeping": core.is_sleeping}, None


class EngineCoreClient:
    """Starts the engine process and moves messages to and from it on two threads."""

    def __init__(
        self,
        config: EngineConfig,
        startup_timeout: float = 600.0,
        engine_index: int = 0,
        cores: list[int] | None = None,
        wait: bool = True,
    ) -> None:
        """Start the engine process; ``wait``: block until it is ready (else call
        ``wait_ready``, so that several replicas load their models at once)."""
        self.engine_index = engine_index
        self._startup_timeout = startup_timeout
        ctx = multiprocessing.get_context("spawn")
        self._cmd_recv, self._cmd_send = ctx.Pipe(duplex=False)
        self._out_recv, self._out_send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=run_engine_core,
            args=(
                config,
                self._cmd_recv,
                self._out_send,
                logging.getLogger("pagellm").getEffectiveLevel(),
                engine_index,
                cores,
            ),
            name=f"pagellm-engine-core-{engine_index}",
            # A daemon process may not start children: with worker processes the core is
            # an ordinary one (it still ends with the API process: die_with_parent, and
            # its command pipe closing).
            daemon=config.parallel.world_size == 1
            or config.parallel.distributed_executor_backend != "mp",
        )
        self.process.start()
        # The child holds these ends; keeping them open here would hide its death.
        self._cmd_recv.close()
        self._out_send.close()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.plan: Any = None
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the engine process has loaded its model (ValueError: it could not)."""
        startup_timeout = self._startup_timeout
        if not self._out_recv.poll(startup_timeout):
            self.process.kill()
            raise RuntimeError(f"the engine process did not start in {startup_timeout:.0f} s")
        try:
            kind, *payload = self._out_recv.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(
                f"the engine process exited during start-up (status {self.process.exitcode})"
            ) from None
        if kind == "error":
            self.process.join(5)
            raise ValueError(payload[0])
        self.plan = payload[0]

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def start(
        self,
        on_message: Callable[[tuple[Any, ...]], None],
        on_dead: Callable[[str], None],
    ) -> None:
        """Start the sender and reader threads; callbacks run on the reader thread."""
        reader = threading.Thread(
            target=self._read, args=(on_message, on_dead), name="pagellm-core-reader", daemon=True
        )
        sender = threading.Thread(target=self._send_loop, name="pagellm-core-sender", daemon=True)
        self._threads = [reader, sender]
        reader.start()
        sender.start()

    def send(self, command: tuple[Any, ...]) -> None:
        """Queue a command for the engine (never blocks)."""
        self._queue.put(command)

    def _send_loop(self) -> None:
        while True:
            cmd = self._queue.get()
            batch = [cmd]
            while True:  # everything queued meanwhile goes in the same message
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._cmd_send.send(batch)
            except (BrokenPipeError, OSError):
                return  # the reader reports the death
            if any(c is _STOP or c[0] == "stop" for c in batch):
                return

    def _read(
        self, on_message: Callable[[tuple[Any, ...]], None], on_dead: Callable[[str], None]
    ) -> None:
        reason = "the engine process exited"
        while True:
            try:
                msg = self._out_recv.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "error":
                reason = f"the engine failed:\n{msg[1]}"
                continue
            on_message(msg)
        if self._closed:
            return
        self.process.join(2)
        code = self.process.exitcode
        on_dead(f"{reason} (status {code})")

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        self.send(_STOP)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        for t in self._threads:
            t.join(1)

    def kill(self) -> None:
        """Kill the engine process (tests of what the server does when it dies)."""
        if self.process.pid is not None:
            os.kill(self.process.pid, 9)
