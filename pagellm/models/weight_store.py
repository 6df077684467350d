"""Where a loaded model's weights live when they should not all sit in RAM or on the GPU.

Two mechanisms, one per device:

``WeightFile`` (CPU, ``--weight-mmap-dir``): the weights are kept in a file-backed
shared mapping, so the kernel pages them in from disk when a step reads them and may
drop them again under memory pressure (a clean page costs nothing to evict). Resident
memory counts only the pages that are present; a model larger than RAM still runs, at
the price of reading from disk whatever was evicted, every step.

    parameters built       map their pages onto the (sparse) file  ->  loading writes
    (empty)                                                            into the file
    finalize repacks       the packed runs' pages are copied into the file and mapped
    (quantized tiles)      over the same addresses

The mapping is placed over the tensors' own addresses (``mmap`` with ``MAP_FIXED``), so
every pointer that already names them (views, the native kernels' descriptors, tied
embeddings) stays valid: nothing is repointed. While the model is built glibc serves
every large allocation with its own ``mmap`` (a low mmap threshold), so each tensor owns
its pages and freeing it unmaps the file's pages with it. The file is unlinked as soon
as it is open: the mappings keep it alive and nothing is left behind when the process
ends. Pick a directory on a real disk: a tmpfs directory is RAM.

This is an image of the weights as the kernels read them rather than a mapping of the
checkpoint itself: pagellm merges q/k/v and gate/up and repacks GGUF blocks into the
kernels' tiles, so the checkpoint's bytes are never the bytes a step reads.

``offload_to_host`` (CUDA, ``--cpu-offload-gb``): that many bytes of decoder layers keep
their parameters in pinned host memory; a forward pre-hook copies a layer's tensors to
the device just before it runs and the forward hook drops the copies after, as vLLM's
offloader streams weights over PCIe each step.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from pagellm.utils import tune_cpu_allocator

logger = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
MIN_MAPPED = 64 << 10
"""Storages smaller than this stay in anonymous memory (norms, biases, small tables)."""


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_long,
    ]  # fmt: skip
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _storages(model: nn.Module, buffers: bool) -> Iterator[torch.UntypedStorage]:
    """Each distinct CPU storage behind the model's parameters (and buffers), once."""
    seen: set[int] = set()
    tensors = [*model.parameters(), *(model.buffers() if buffers else ())]
    for t in tensors:
        if t.device.type != "cpu":
            continue
        st = t.untyped_storage()
        if st.nbytes() == 0 or st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        yield st


class WeightFile:
    """A sparse, unlinked file in ``directory`` that backs the model's weight pages."""

    def __init__(self, directory: str) -> None:
        self.libc = _libc()
        if self.libc is None or not hasattr(os, "pwrite"):
            raise ValueError("weight_mmap_dir needs Linux with glibc (mmap over the weights)")
        try:
            os.makedirs(directory, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix="pagellm-weights-", dir=directory)
        except OSError as e:
            raise ValueError(
                f"weight_mmap_dir {directory!r} is not a writable directory: {e}"
            ) from None
        os.unlink(path)  # the mappings hold the inode; nothing outlives the process
        self.fd, self.directory, self.name = fd, directory, os.path.basename(path)
        self.size = 0
        self.ranges: list[tuple[int, int]] = []  # (address, length) of mapped pages

    @property
    def mapped_bytes(self) -> int:
        return sum(n for _, n in self.ranges)

    @contextmanager
    def own_pages(self) -> Iterator[None]:
        """While building: every allocation from 64 KiB up gets its own mmap, so the file
        pages laid over it belong to that tensor alone (and leave with it)."""
        tune_cpu_allocator(mmap_threshold=MIN_MAPPED)
        try:
            yield
        finally:
            tune_cpu_allocator()  # back to pagellm's CPU setting

    def map_model(self, model: nn.Module, copy: bool) -> int:
        """Lay file pages over every storage of ``model`` not mapped yet. ``copy``: keep
        what they hold, for every parameter and buffer; else only the parameters, which
        must be empty (before loading: each is then filled exactly once; buffers such as
        the rotary table are built with their values). Returns the bytes mapped."""
        # Asked of the kernel, not remembered: a storage freed since the last call may
        # have left its address to a new one.
        ours = [(lo, hi) for lo, hi, path in _maps() if self.name in path]
        done = 0
        for st in _storages(model, buffers=copy):
            addr = st.data_ptr()
            first_page = -(-addr // PAGE) * PAGE
            if st.nbytes() < MIN_MAPPED or any(lo <= first_page < hi for lo, hi in ours):
                continue
            done += self._map(addr, st.nbytes(), copy)
        return done

    def _map(self, addr: int, nbytes: int, copy: bool) -> int:
        start = -(-addr // PAGE) * PAGE  # whole pages inside the storage
        end = (addr + nbytes) // PAGE * PAGE
        length = end - start
        if length <= 0:
            return 0
        offset = self.size
        os.ftruncate(self.fd, offset + length)
        if copy:
            view = memoryview((ctypes.c_char * length).from_address(start)).cast("B")
            written = 0
            while written < length:
                written += os.pwrite(self.fd, view[written:], offset + written)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_SHARED | 0x10  # MAP_FIXED: over the tensor's own pages
        got = self.libc.mmap(start, length, prot, flags, self.fd, offset)  # type: ignore[union-attr]
        if got != start:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of the weight file failed: {os.strerror(err)}")
        self.size += length
        self.ranges.append((start, length))
        return length

    def drop_resident(self) -> None:
        """Drop every mapped page from this process (they are read back from the file on
        the next touch): what the kernel does under pressure, on demand (tests, docs)."""
        for start, length in self.ranges:  # MADV_DONTNEED; dirty pages are in the file
            self.libc.madvise(start, length, 4)  # type: ignore[union-attr]


def _maps() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's mappings."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, parts[5].strip() if len(parts) > 5 else ""))
    return out


def resident_bytes(ranges: list[tuple[int, int]]) -> int:
    """Resident bytes of the given address ranges (from /proc/self/smaps)."""
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if not head.endswith(":"):  # a mapping's first line: "lo-hi perms ..."
                    lo = int(head.split("-")[0], 16)
                    inside = any(a <= lo < a + n for a, n in ranges)
                elif head == "Rss:" and inside:
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


# ---- CUDA: stream offloaded layers from pinned host memory -------------------------


class HostOffload:
    """Which layers stream their weights from host memory, and how many bytes."""

    def __init__(self) -> None:
        self.layers: list[str] = []
        self.bytes = 0
        self.streamed_bytes = 0  # copied to the device so far
        self.handles: list[Any] = []


def offload_to_host(model: nn.Module, nbytes: int, device: torch.device) -> HostOffload:
    """Keep the parameters of the first decoder layers (up to ``nbytes``) in host memory
    (pinned when CUDA is there) and copy them to ``device`` for each forward pass."""
    plan = HostOffload()
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None or nbytes <= 0:
        return plan
    pin = torch.cuda.is_available()
    for i, layer in enumerate(layers):
        if plan.bytes >= nbytes:
            break
        params = [p for p in layer.parameters(recurse=True)]
        if not params:
            continue
        host = []
        for p in params:
            h = p.data.to("cpu", copy=True)
            host.append(h.pin_memory() if pin else h)
            plan.bytes += h.numel() * h.element_size()
        for p, h in zip(params, host):
            p.data = h

        def pre(_m: nn.Module, _args: Any, params: list = params, host: list = host) -> None:
            for p, h in zip(params, host):
                p.data = h.to(device, non_blocking=True, copy=True)
                plan.streamed_bytes += h.numel() * h.element_size()

        def post(_m: nn.Module, _args: Any, _out: Any, params: list = params,
                 host: list = host) -> None:  # fmt: skip
            for p, h in zip(params, host):
                p.data = h  # the device copy is freed

        plan.handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
        plan.layers.append(f"layers.{i}")
    logger.info(
        "weight offload: %d decoder layers (%.2f GiB) stream from host memory each step",
        len(plan.layers), plan.bytes / (1 << 30),
    )  # fmt: skip
    return plan
