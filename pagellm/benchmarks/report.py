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
    from pagellm.layers import native

    info["cpu"] = native.cpu_model_name()
    # The features that decide which kernels run (every table names its machine).
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16")
    info["cpu_features"] = [f for f in wanted if f in native.cpu_features()]
    info["kernel_isas"] = native.supported_isas()
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


_DB_COLUMNS = (
    ("date", "TEXT"),
    ("base_url", "TEXT"),
    ("endpoint", "TEXT"),
    ("model", "TEXT"),
    ("dataset", "TEXT"),
    ("num_prompts", "INTEGER"),
    ("max_concurrency", "INTEGER"),
    ("request_rate", "TEXT"),
    ("completed", "INTEGER"),
    ("failed", "INTEGER"),
    ("duration", "REAL"),
    ("request_throughput", "REAL"),
    ("output_throughput", "REAL"),
    ("total_token_throughput", "REAL"),
    ("goodput", "REAL"),
    ("ttft_mean_ms", "REAL"),
    ("ttft_median_ms", "REAL"),
    ("ttft_p99_ms", "REAL"),
    ("tpot_mean_ms", "REAL"),
    ("tpot_median_ms", "REAL"),
    ("tpot_p99_ms", "REAL"),
    ("itl_median_ms", "REAL"),
    ("itl_p99_ms", "REAL"),
    ("e2el_median_ms", "REAL"),
    ("e2el_p99_ms", "REAL"),
    ("result_json", "TEXT"),
)


def append_results_db(path: str, run: dict[str, Any]) -> None:
    """Append one benchmark run as a row of the ``runs`` table (created if missing)."""
    import json
    import sqlite3

    flat = {
        **{k: run.get(k) for k, _ in _DB_COLUMNS},
        "request_rate": str(run.get("request_rate")),
        "result_json": json.dumps(run),
    }
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p99"):
            key = f"{metric}_{stat}_ms"
            if key in flat:
                flat[key] = run[f"{metric}_ms"][stat]
    cols = ", ".join(f"{k} {t}" for k, t in _DB_COLUMNS)
    with sqlite3.connect(path) as db:
        db.execute(
            f"CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY AUTOINCREMENT, {cols})"
        )
        names = [k for k, _ in _DB_COLUMNS]
        db.execute(
            f"INSERT INTO runs ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})",
            [flat[k] for k in names],
        )


def plot_sweep(runs: Sequence[dict[str, Any]], out_dir: str) -> list[str]:
    """throughput.png and latency.png against max concurrency; returns the file paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    xs = [r["max_concurrency"] or 0 for r in runs]
    labels = [str(r["max_concurrency"] or "inf") for r in runs]
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["output_throughput"] for r in runs], "o-", label="output tok/s")
    ax.plot(xs, [r["total_token_throughput"] for r in runs], "s--", label="total tok/s")
    ax.set_xlabel("max concurrency")
    ax.set_ylabel("tokens / s")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["request_throughput"] for r in runs], "^:", color="gray", label="requests/s")
    ax2.set_ylabel("requests / s")
    ax.set_xticks(xs, labels)
    ax.set_title(f"{runs[0].get('model', '')}: throughput")
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, "throughput.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "itl_ms"), ("TTFT", "TPOT", "ITL")):
        for stat, style in (("median", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(xs, [r[key][stat] for r in runs], style, label=stat)
        ax.set_title(f"{title} (ms)")
        ax.set_xlabel("max concurrency")
        ax.set_xticks(xs, labels)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "latency.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths
