"""Sleep mode's worker side: what a sleeping worker frees and how it proves it.

A worker asleep holds no KV tensors (level 1 and 2) and, at level 2, no weights; on
CUDA level 1 also moves the weights to host memory. What sleep drops must leave the
process, not only Python: ``release_memory`` collects the garbage, hands the CUDA
allocator's cache back to the driver and asks glibc to return the free pages of its
heaps (``malloc_trim``; pagellm raises the trim threshold so that per-step activations
stay on the heap, see ``tune_cpu_allocator``, which keeps freed KV pages resident until
trimmed). ``rss_bytes`` reads this process's resident set for the sleep/wake replies.
"""

from __future__ import annotations

import ctypes
import gc
import os
from typing import Any

import torch
from torch import nn

SLEEP_TAGS = ("weights", "kv_cache")
"""What ``wake_up(tags)`` may restore separately (vLLM's tags); none given: both."""


def check_sleep_level(level: Any) -> int:
    """The level as an int (ValueError unless 1 or 2)."""
    if isinstance(level, bool) or level not in (1, 2):
        raise ValueError(
            f"level must be 1 (free the KV cache; on GPU also move the weights to host "
            f"memory) or 2 (free the KV cache and the weights), got {level!r}"
        )
    return int(level)


def check_wake_tags(tags: Any) -> tuple[str, ...]:
    """The parts to wake, in the order they are restored (ValueError for an unknown tag)."""
    if tags is None or (not isinstance(tags, str) and len(tags) == 0):
        return SLEEP_TAGS
    if isinstance(tags, str):
        tags = [tags]
    unknown = sorted(set(tags) - set(SLEEP_TAGS))
    if unknown:
        raise ValueError(
            f"tags must be among {', '.join(SLEEP_TAGS)} (none: both), got {', '.join(unknown)}"
        )
    return tuple(t for t in SLEEP_TAGS if t in tags)


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (default: this one), from /proc or psutil; 0 when
    neither can tell."""
    path = f"/proc/{pid or 'self'}/status"
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.Process(pid or os.getpid()).memory_info().rss)
    except Exception:
        return 0


def release_memory(device: torch.device) -> None:
    """Make memory that was just dropped leave the process (see the module docstring)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (macOS, musl): the allocator keeps what it keeps
    libc.malloc_trim(0)


def tensor_bytes(tensors: Any) -> int:
    return sum(int(t.numel() * t.element_size()) for t in tensors)


class DiscardedModel(nn.Module):
    """Stands in for a model whose weights sleep level 2 dropped (until wake_up)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the model's weights are asleep (sleep level 2): call wake_up first")
