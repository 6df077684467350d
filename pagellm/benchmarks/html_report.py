"""``pagellm bench report``: benchmark JSON files rendered as one self-contained HTML page.

Reads what ``pagellm bench serve --output-json`` (one run or a concurrency sweep),
``bench throughput --output-json`` and ``bench latency --output-json`` write, one series
per file (several files: side by side, e.g. pagellm against another engine run with the
same client). The plots are inline SVG drawn here and the styles are inline: the page
loads nothing from anywhere, so it can be mailed or opened on an air-gapped box.
"""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Sequence
from typing import Any

_COLORS = ("#2f6fed", "#e8590c", "#2e7d32", "#9c27b0", "#c62828", "#00838f", "#6d4c41")
_DASHES = ("", "6 3", "2 3", "8 3 2 3")
_LATENCY_KEYS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E"))


def _kind(doc: Any) -> str:
    if isinstance(doc, list) and doc and all(isinstance(r, dict) and "ttft_ms" in r for r in doc):
        return "serve"
    if isinstance(doc, dict) and "ttft_ms" in doc:
        return "serve"
    if isinstance(doc, dict) and "rows" in doc and "peaks" in doc:
        return "latency"
    if isinstance(doc, dict) and "requests_per_second" in doc and "output_throughput" in doc:
        return "throughput"
    raise ValueError("not a pagellm bench result (serve, throughput or latency --output-json)")


def load(paths: Sequence[str], labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Each file as {label, kind, runs | result}; ValueError names a file it can't use."""
    if labels and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} files")
    out = []
    for i, path in enumerate(paths):
        try:
            with open(path) as f:
                doc = json.load(f)
            kind = _kind(doc)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None
        label = labels[i] if labels else os.path.splitext(os.path.basename(path))[0]
        runs = (doc if isinstance(doc, list) else [doc]) if kind == "serve" else None
        out.append({"label": label, "kind": kind, "path": path, "runs": runs, "result": doc})
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}"
    return "–" if v is None else str(v)


def svg_chart(
    title: str,
    series: Sequence[tuple[str, Sequence[tuple[Any, float]], int, int]],
    xlabel: str,
    ylabel: str,
    width: int = 560,
    height: int = 300,
) -> str:
    """A line chart as inline SVG. ``series``: (name, [(x, y)], color index, dash index);
    x values are categories (placed evenly in their sorted order)."""
    xs = sorted({x for _, pts, _, _ in series for x, _ in pts}, key=lambda v: (str(type(v)), v))
    ys = [y for _, pts, _, _ in series for _, y in pts if y is not None]
    top = max(ys) if ys else 1.0
    top = _nice(top * 1.05)
    left, right, up, down = 60, 12, 30, 64 + 16 * ((len(series) + 1) // 2)
    pw, ph = width - left - right, height - up - down
    xpos = {x: left + (pw * (i + 0.5) / max(len(xs), 1)) for i, x in enumerate(xs)}

    def ypos(v: float) -> float:
        return up + ph - ph * v / top

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="18" font-size="14" font-weight="600">{html.escape(title)}</text>',
    ]
    for i in range(5):
        v = top * i / 4
        y = ypos(v)
        parts.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
        )
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{v:g}</text>'
        )
    for x, px in xpos.items():
        parts.append(
            f'<text x="{px:.1f}" y="{up + ph + 16}" font-size="11" text-anchor="middle">'
            f"{html.escape(str(x))}</text>"
        )
    parts.append(
        f'<text x="{left + pw / 2:.1f}" y="{up + ph + 34}" font-size="12" '
        f'text-anchor="middle">{html.escape(xlabel)}</text>'
    )
    parts.append(
        f'<text transform="translate(14 {up + ph / 2:.1f}) rotate(-90)" font-size="12" '
        f'text-anchor="middle">{html.escape(ylabel)}</text>'
    )
    for k, (name, pts, color, dash) in enumerate(series):
        c = _COLORS[color % len(_COLORS)]
        d = _DASHES[dash % len(_DASHES)]
        coords = [(xpos[x], ypos(y)) for x, y in sorted(pts, key=lambda p: xs.index(p[0]))
                  if y is not None]  # fmt: skip
        if len(coords) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in coords)
            parts.append(
                f'<polyline class="series" data-name="{html.escape(name)}" points="{path}" '
                f'fill="none" stroke="{c}" stroke-width="2" stroke-dasharray="{d}"/>'
            )
        for px, py in coords:
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{c}"/>')
        lx = left + (k % 2) * (pw / 2)
        ly = up + ph + 52 + 16 * (k // 2)
        parts.append(
            f'<line x1="{lx:.1f}" x2="{lx + 22:.1f}" y1="{ly - 4}" y2="{ly - 4}" stroke="{c}" '
            f'stroke-width="2" stroke-dasharray="{d}"/>'
            f'<text x="{lx + 28:.1f}" y="{ly}" font-size="11">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _nice(v: float) -> float:
    if v <= 0:
        return 1.0
    import math

    p = 10 ** math.floor(math.log10(v))
    return next(m * p for m in (1, 2, 2.5, 5, 10) if m * p >= v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _concurrency(run: dict[str, Any]) -> Any:
    c = run.get("max_concurrency")
    return c if c is not None else "inf"


def _serve_section(items: list[dict[str, Any]]) -> str:
    charts = []
    thr = [(f"{it['label']} output tok/s", [(_concurrency(r), r["output_throughput"]) for r in it["runs"]], i, 0)
           for i, it in enumerate(items)]  # fmt: skip
    thr += [(f"{it['label']} total tok/s", [(_concurrency(r), r["total_token_throughput"]) for r in it["runs"]], i, 1)
            for i, it in enumerate(items)]  # fmt: skip
    charts.append(svg_chart("Throughput vs concurrency", thr, "max concurrency", "tokens / s"))
    charts.append(svg_chart(
        "Requests per second",
        [(it["label"], [(_concurrency(r), r["request_throughput"]) for r in it["runs"]], i, 0)
         for i, it in enumerate(items)],
        "max concurrency", "requests / s",
    ))  # fmt: skip
    for key, name in _LATENCY_KEYS:
        if not all(key in r for it in items for r in it["runs"]):
            continue
        lines = [
            (
                f"{it['label']} {stat}",
                [(_concurrency(r), r[key].get(stat)) for r in it["runs"]],
                i,
                j,
            )
            for i, it in enumerate(items)
            for j, stat in enumerate(("median", "p90", "p99"))
        ]
        charts.append(svg_chart(f"{name} percentiles", lines, "max concurrency", "ms"))
    header = ["series", "concurrency", "rate", "completed", "failed", "req/s", "out tok/s",
              "total tok/s", "TTFT med", "TTFT p99", "TPOT med", "TPOT p99", "ITL med",
              "ITL p99", "E2E med", "E2E p99"]  # fmt: skip
    rows = [
        [it["label"], _concurrency(r), r.get("request_rate"), r.get("completed"), r.get("failed"),
         r["request_throughput"], r["output_throughput"], r["total_token_throughput"],
         *(r.get(k, {}).get(s) for k, _ in _LATENCY_KEYS for s in ("median", "p99"))]
        for it in items for r in it["runs"]
    ]  # fmt: skip
    return (
        "<h2>Serving</h2>"
        + '<div class="charts">' + "".join(f'<figure>{c}</figure>' for c in charts) + "</div>"
        + "<p class='note'>Latencies in ms.</p>"
        + _table(header, rows)
    )  # fmt: skip


def _throughput_section(items: list[dict[str, Any]]) -> str:
    bars = [(it["label"], [(it["label"], it["result"]["output_throughput"])], i, 0)
            for i, it in enumerate(items)]  # fmt: skip
    header = ["series", "backend", "model", "dtype", "prompts", "input", "output", "req/s",
              "out tok/s", "total tok/s", "elapsed s"]  # fmt: skip
    rows = [
        [it["label"], r.get("backend"), r.get("model"), r.get("dtype"), r.get("num_prompts"),
         r.get("input_len"), r.get("output_len"), r["requests_per_second"], r["output_throughput"],
         r["total_token_throughput"], r.get("elapsed_s")]
        for it in items for r in [it["result"]]
    ]  # fmt: skip
    chart = svg_chart("Offline output throughput", bars, "series", "tokens / s")
    return (
        f"<h2>Offline throughput</h2><div class='charts'><figure>{chart}</figure></div>"
        + _table(header, rows)
    )


def _latency_section(items: list[dict[str, Any]]) -> str:
    decode = [(it["label"], [(r["batch_size"], r["decode_tok_s"]) for r in it["result"]["rows"]], i, 0)
              for i, it in enumerate(items)]  # fmt: skip
    prefill = [(it["label"], [(r["batch_size"], r["prefill_ms"]) for r in it["result"]["rows"]], i, 0)
               for i, it in enumerate(items)]  # fmt: skip
    header = ["series", "batch", "input", "output", "prefill ms", "decode step ms", "decode tok/s",
              "decode % roofline", "prefill % roofline"]  # fmt: skip
    rows = [
        [it["label"], r["batch_size"], r["input_len"], r["output_len"], r["prefill_ms"],
         r["decode_step_ms"], r["decode_tok_s"], 100 * r["decode_roofline_share"],
         100 * r["prefill_roofline_share"]]
        for it in items for r in it["result"]["rows"]
    ]  # fmt: skip
    charts = [
        svg_chart("Decode throughput vs batch size", decode, "batch size", "tokens / s"),
        svg_chart("Prefill time vs batch size", prefill, "batch size", "ms"),
    ]
    return (
        "<h2>Latency</h2><div class='charts'>"
        + "".join(f"<figure>{c}</figure>" for c in charts)
        + "</div>"
        + _table(header, rows)
    )


def _machine(item: dict[str, Any]) -> dict[str, Any] | None:
    runs = item["runs"] or [item["result"]]
    return runs[0].get("machine") if isinstance(runs[0], dict) else None


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1d1d1f; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; border: 1px solid #ddd; border-radius: 8px; padding: 6px; }
table { border-collapse: collapse; font-size: 13px; margin-top: 10px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f5; } td:first-child { text-align: left; }
.note { color: #666; font-size: 13px; }
"""


def render(items: list[dict[str, Any]], title: str = "pagellm benchmark report") -> str:
    """The whole page."""
    sections = []
    for kind, build in (("serve", _serve_section), ("throughput", _throughput_section),
                        ("latency", _latency_section)):  # fmt: skip
        chosen = [it for it in items if it["kind"] == kind]
        if chosen:
            sections.append(build(chosen))
    machines = [
        [it["label"], m.get("cpu"), m.get("cpu_count"), ", ".join(m.get("cpu_features") or []),
         m.get("torch"), m.get("gpu")]
        for it in items if (m := _machine(it))
    ]  # fmt: skip
    if machines:
        sections.append("<h2>Machines</h2>" + _table(
            ["series", "CPU", "cores", "features", "torch", "GPU"], machines
        ))  # fmt: skip
    files = "".join(
        f"<li>{html.escape(it['label'])}: {html.escape(it['path'])}</li>" for it in items
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p class='note'>Generated {time.strftime('%Y-%m-%d %H:%M')} from:</p><ul class='note'>{files}</ul>"
        + "".join(sections)
        + "</body></html>"
    )


def main(args: Any) -> int:
    labels = args.labels.split(",") if args.labels else None
    items = load(args.inputs, labels)
    page = render(items, args.title)
    with open(args.output, "w") as f:
        f.write(page)
    print(f"wrote {args.output} ({len(page) // 1024} KiB, {len(items)} series)")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="render bench JSON results as a self-contained HTML page with plots"
    )
    p.add_argument("inputs", nargs="+", help="JSON files from bench serve/throughput/latency")
    p.add_argument("-o", "--output", default="bench-report.html")
    p.add_argument(
        "--labels", default=None, help="comma-separated series names (default: file names)"
    )
    p.add_argument("--title", default="pagellm benchmark report")
    p.set_defaults(handler=main)
