"""Small helpers shared across layers (no torch, no model code)."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def strict_kwargs(cls: type[T]) -> type[T]:
    """Make a dataclass reject unknown keyword arguments with a ValueError naming them.

    A misspelt option (``temprature=0.5``) must fail loudly rather than raise a
    TypeError that callers may not expect from a validation step.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__} got unknown keyword argument(s): {', '.join(unknown)}"
            )
        original(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def random_uuid() -> str:
    return uuid.uuid4().hex


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(a // -b)


def get_open_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cache_dir(*parts: str) -> str:
    """pagellm's own cache folder (converted tokenizers, compiled kernels)."""
    root = os.environ.get("PAGELLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pagellm"
    )
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_size(value: str | int | float) -> int:
    """Parse '4GiB', '512MB', '2e9' or a plain number of bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    s = value.strip().replace(" ", "")
    units = {
        "kib": 1 << 10,
        "mib": 1 << 20,
        "gib": 1 << 30,
        "tib": 1 << 40,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "k": 1 << 10,
        "m": 1 << 20,
        "g": 1 << 30,
        "b": 1,
    }
    lower = s.lower()
    for suffix, mult in units.items():
        if lower.endswith(suffix) and lower[: -len(suffix)]:
            try:
                return int(float(lower[: -len(suffix)]) * mult)
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise ValueError(f"cannot parse a size in bytes from {value!r}") from None


def run_once(fn: Callable[[], T]) -> Callable[[], T]:
    return functools.lru_cache(maxsize=None)(fn)


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux; elsewhere a no-op):
    a child process must not outlive the one that started it."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def tune_cpu_allocator(mmap_threshold: int = 256 << 20) -> None:
    """Keep large CPU tensors on the heap instead of fresh mmap()s.

    glibc serves big allocations (a [64, 49152] logits tensor is 12 MB) with mmap and
    returns them on free, so every step page-faults its activations in again: the
    sampler's softmax ran 4x slower inside the engine than alone. Raising the mmap and
    trim thresholds makes freed blocks reusable. Linux/glibc only; harmless elsewhere.
    ``mmap_threshold``: a lower one while weights are built into a file-backed mapping
    (pagellm.models.weight_store), where each tensor must own its pages.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, mmap_threshold)
    libc.mallopt(m_trim_threshold, 512 << 20)
