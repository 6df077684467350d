"""Printing and recording benchmark results."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def print_table(title: str, rows: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows) + 2
    vwidth = max(len(str(v)) for _, v in rows) + 2
    line = "+" + "-" * (width + 1) + "+" + "-" * (vwidth + 1) + "+"
    print(f"\n{title}")
    print(line)
    for k, v in rows:
        print(f"| {k:<{width}}| {v!s:>{vwidth}} |")
    print(line)


def print_grid(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cols = [header, *rows]
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    print(f"\n{title}")
    print(sep)
    print("| " + " | ".join(f"{h:<{w}}" for h, w in zip(header, widths)) + " |")
    print(sep)
    for r in rows:
        print("| " + " | ".join(f"{v!s:>{w}}" for v, w in zip(r, widths)) + " |")
    print(sep)
