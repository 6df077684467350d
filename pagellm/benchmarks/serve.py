"""``pagellm bench serve``: load-test any OpenAI-compatible server (pagellm, vLLM,
SGLang, llama.cpp's server, ...) with streaming requests.

Arrivals are Poisson at ``--request-rate`` (gamma inter-arrival times when
``--burstiness`` != 1) or all at once (``inf``), bounded by ``--max-concurrency``; a
comma-separated concurrency list runs a sweep. Metrics follow ``vllm bench serve``
(see metrics.py); each run is printed like evalscope's summary and percentile tables,
written to ``--output-json``, appended to the SQLite ``--results-db`` and plotted into
``--plot-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import time
from typing import Any

from pagellm.benchmarks.datasets import (
    RandomRequest,
    load_sharegpt_requests,
    parse_range,
    sample_prefix_repetition_requests,
    sample_random_text_requests,
)
from pagellm.benchmarks.metrics import (
    RequestResult,
    compute_metrics,
    parse_goodput,
    percentile_table,
)
from pagellm.benchmarks.report import (
    append_results_db,
    machine_info,
    plot_sweep,
    print_grid,
    print_table,
)

logger = logging.getLogger(__name__)


# Connection errors that happen before a response starts: the server closed a kept-alive
# connection (llama.cpp's server does, between requests) or refused the write. The request
# never reached the server, so it is sent again on a fresh connection.
_RETRIES_BEFORE_RESPONSE = 3


async def send_request(
    session: Any,
    url: str,
    endpoint: str,
    model: str,
    req: RandomRequest,
    ignore_eos: bool,
    headers: dict[str, str],
    tokenizer: Any,
    abandon_after: int | None = None,
    extra: dict[str, Any] | None = None,
) -> RequestResult:
    """One streaming request; never raises (errors become failed results). With
    ``abandon_after`` the client leaves after that many content chunks (a disconnect)."""
    import aiohttp

    body: dict[str, Any] = {
        "model": model,
        "max_tokens": req.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
    }
    if endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt if req.prompt is not None else req.prompt_token_ids
    if ignore_eos:
        body["ignore_eos"] = True
    body.update(extra or {})
    result = RequestResult(success=False, start=time.perf_counter(), prompt_tokens=req.prompt_len)
    text_parts: list[str] = []
    usage: dict[str, Any] | None = None
    try:
        for attempt in range(_RETRIES_BEFORE_RESPONSE + 1):
            try:
                resp = await session.post(url + endpoint, json=body, headers=headers)
                break
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                if attempt == _RETRIES_BEFORE_RESPONSE:
                    raise
                result.start = time.perf_counter()  # nothing reached the server
        async with resp:
            if resp.status != 200:
                detail = (await resp.text())[:300]
                result.error = f"HTTP {resp.status}: {detail}"
                result.end = time.perf_counter()
                return result
            buffer = b""
            async for raw in resp.content:
                buffer += raw
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RuntimeError(str(chunk["error"].get("message", chunk["error"])))
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        piece = choice.get("text")
                        if piece is None:
                            piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            result.chunk_times.append(time.perf_counter())
                            text_parts.append(piece)
                    if abandon_after is not None and len(result.chunk_times) >= abandon_after:
                        result.abandoned = True
                        result.end = time.perf_counter()
                        return result  # leaving the `async with` closes the connection
        result.end = time.perf_counter()
        if usage is not None:
            result.output_tokens = int(usage.get("completion_tokens", 0))
            result.prompt_tokens = int(usage.get("prompt_tokens", req.prompt_len))
        else:  # servers that ignore include_usage: count by re-tokenizing
            result.output_tokens = len(
                tokenizer.encode("".join(text_parts), add_special_tokens=False)
            )
        result.success = bool(result.chunk_times) or result.output_tokens > 0
        if not result.success:
            result.error = "the stream held no tokens"
    except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError, ValueError) as e:
        result.end = time.perf_counter()
        result.error = f"{type(e).__name__}: {e}"
    return result


# A JSON schema whose documents outrun any usual --output-len (40 records of a few fields):
# constrained requests then stop at max_tokens like unconstrained ones, so the two runs
# produce the same number of tokens and their TPOTs compare.
RECORDS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "minItems": 40,
            "maxItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "role": {"enum": ["admin", "editor", "viewer"]},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
                    "score": {"type": "number"},
                },
                "required": ["name", "age", "role", "tags", "score"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["records"],
    "additionalProperties": False,
}  # fmt: skip


def constraint_fields(args: argparse.Namespace) -> dict[str, Any] | None:
    """The request fields that constrain every request to --json-schema (or None)."""
    if not getattr(args, "json_schema", None):
        return None
    if args.json_schema == "records":
        schema = RECORDS_SCHEMA
    else:
        with open(args.json_schema) as f:
            schema = json.load(f)
    if args.endpoint.endswith("chat/completions"):
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "bench", "schema": schema},
            }
        }
    return {"guided_json": schema}  # vLLM's (and pagellm's) completions field


async def run_once(
    args: argparse.Namespace,
    requests: list[RandomRequest],
    concurrency: int | None,
    tokenizer: Any,
) -> tuple[list[RequestResult], float]:
    import aiohttp
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    rng = random.Random(args.seed)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=0)
    constraint = constraint_fields(args)
    bar = tqdm(
        total=len(requests), desc=f"concurrency {concurrency or 'inf'}", disable=args.no_progress
    )
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        models = lora_models(args) or [args.model]

        async def one(i: int, req: RandomRequest) -> RequestResult:
            leave = None
            if args.disconnect_rate and rng.random() < args.disconnect_rate:
                leave = rng.randrange(0, max(1, req.output_len // 2))
            async with limit if limit is not None else contextlib.nullcontext():
                r = await send_request(
                    session,
                    args.base_url,
                    args.endpoint,
                    models[i % len(models)],
                    req,
                    args.ignore_eos,
                    headers,
                    tokenizer,
                    leave,
                    constraint,
                )
            bar.update(1)
            return r

        # Warm-up: one short request (not from the dataset, so it seeds no prefix cache).
        warm = RandomRequest([], 2, "Hello")
        await send_request(
            session, args.base_url, args.endpoint, args.model, warm, False, headers, tokenizer
        )
        started = time.perf_counter()
        tasks = []
        for i, req in enumerate(requests):
            tasks.append(asyncio.ensure_future(one(i, req)))
            if args.request_rate != float("inf"):
                shape = args.burstiness
                await asyncio.sleep(rng.gammavariate(shape, 1.0 / (args.request_rate * shape)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - started
    bar.close()
    return results, duration


def lora_models(args: argparse.Namespace) -> list[str]:
    """--lora-modules: the model names requests take in turn (adapters, or the base)."""
    value = getattr(args, "lora_modules", None)
    return [n for n in value.split(",") if n] if value else []


def build_requests(args: argparse.Namespace, tokenizer: Any) -> list[RandomRequest]:
    in_range = parse_range(args.input_len)
    out_range = parse_range(args.output_len)
    if args.dataset == "random":
        return sample_random_text_requests(
            tokenizer, args.num_prompts, in_range, out_range, args.seed
        )
    if args.dataset == "sharegpt":
        if not args.dataset_path:
            raise ValueError("--dataset sharegpt needs --dataset-path FILE (ShareGPT JSON)")
        return load_sharegpt_requests(
            args.dataset_path, tokenizer, args.num_prompts, out_range, args.seed
        )
    return sample_prefix_repetition_requests(
        tokenizer,
        args.num_prompts,
        args.prefix_len,
        in_range,
        out_range,
        args.num_prefixes,
        args.seed,
    )


def run(args: argparse.Namespace) -> int:
    from pagellm.engine.tokenizer import load_tokenizer
    from pagellm.models.loader import resolve_model_path

    args.base_url = args.base_url.rstrip("/")
    if args.base_url.endswith("/v1"):
        args.base_url = args.base_url[: -len("/v1")]
    if args.request_rate <= 0:
        raise ValueError(f"--request-rate must be positive or inf, got {args.request_rate}")
    if args.burstiness <= 0:
        raise ValueError(f"--burstiness must be positive, got {args.burstiness}")
    slos = parse_goodput(args.goodput)
    tokenizer = load_tokenizer(args.tokenizer or resolve_model_path(None))
    if args.model is None:
        args.model = _first_model(args)
    sweep: list[int | None] = list(args.max_concurrency) if args.max_concurrency else [None]
    runs = []
    base_seed = args.seed
    for level, concurrency in enumerate(sweep):
        # Fresh prompts per sweep level: a server's prefix cache must not carry hits
        # from one level to the next (the workload's own sharing stays intact).
        args.seed = base_seed + 1000 * level
        requests = build_requests(args, tokenizer)
        counters_before = _server_counters(args)
        results, duration = asyncio.run(run_once(args, requests, concurrency, tokenizer))
        wave = 0
        while args.duration and duration < args.duration:  # a soak: new prompts per wave
            wave += 1
            args.seed = base_seed + 1000 * level + wave
            more, took = asyncio.run(
                run_once(args, build_requests(args, tokenizer), concurrency, tokenizer)
            )
            results += more
            duration += took
        m = compute_metrics(results, duration, slos)
        m.update(_counter_metrics(counters_before, _server_counters(args)))
        m.update(
            date=time.strftime("%Y-%m-%d %H:%M:%S"),
            base_url=args.base_url,
            endpoint=args.endpoint,
            model=",".join(lora_models(args)) or args.model,
            dataset=args.dataset,
            num_prompts=len(requests),
            seed=args.seed,
            input_len=args.input_len,
            output_len=args.output_len,
            max_concurrency=concurrency,
            request_rate=args.request_rate if args.request_rate != float("inf") else "inf",
            burstiness=args.burstiness,
            machine=machine_info(),
        )
        _print_run(m, results)
        runs.append(m)
        if args.results_db:
            append_results_db(args.results_db, m)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(runs[0] if len(runs) == 1 else runs, f, indent=2)
    if args.plot_dir:
        plot_sweep(runs, args.plot_dir)
    return 0 if all(r["completed"] for r in runs) else 1


_COUNTERS = (
    "spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
    "spec_decode_num_accepted_tokens_total", "prefix_cache_queries_total",
    "prefix_cache_hits_total",
)  # fmt: skip


def _server_counters(args: argparse.Namespace) -> dict[str, float]:
    """The server's speculative-decoding and prefix-cache counters from its Prometheus
    /metrics, summed over engines (data-parallel replicas); pagellm's names, else vLLM's
    (pagellm exports both for the prefix cache: counted once). Empty when unreadable."""
    import urllib.request

    req = urllib.request.Request(args.base_url + "/metrics")
    if args.api_key:
        req.add_header("Authorization", f"Bearer {args.api_key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return {}
    found: dict[str, dict[str, float]] = {"pagellm": {}, "vllm": {}}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        prefix, _, base = name.split("{")[0].rpartition(":")
        if base in _COUNTERS and prefix in found:
            found[prefix][base] = found[prefix].get(base, 0.0) + float(value.split()[0])
    return {k: found["pagellm"].get(k, found["vllm"].get(k, 0.0)) for k in _COUNTERS
            if k in found["pagellm"] or k in found["vllm"]}  # fmt: skip


def _counter_metrics(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the run did to the server's counters: speculative acceptance, prefix hits."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    out: dict[str, float] = {}
    tokens = d.get("spec_decode_num_draft_tokens_total", 0.0)
    if tokens > 0:
        accepted = d.get("spec_decode_num_accepted_tokens_total", 0.0)
        out["spec_acceptance_rate"] = accepted / tokens
        out["spec_mean_accepted_length"] = 1 + accepted / max(
            d.get("spec_decode_num_drafts_total", 0.0), 1
        )
    queries = d.get("prefix_cache_queries_total", 0.0)
    if queries > 0:
        out["prefix_cache_hit_rate"] = d.get("prefix_cache_hits_total", 0.0) / queries
    return out


def _first_model(args: argparse.Namespace) -> str:
    import urllib.request

    req = urllib.request.Request(args.base_url + "/v1/models")
    if args.api_key:
        req.add_header("Authorization", f"Bearer {args.api_key}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return str(json.load(resp)["data"][0]["id"])


def _print_run(m: dict[str, Any], results: list[RequestResult]) -> None:
    def stat(key: str, field: str) -> str:
        return f"{m[key][field]:.2f}"

    rows: list[tuple[str, Any]] = [
        ("Max concurrency", m["max_concurrency"] or "inf"),
        ("Request rate (req/s)", m["request_rate"]),
        ("Succeeded / failed / abandoned", f"{m['completed']} / {m['failed']} / {m['abandoned']}"),
        ("Benchmark duration (s)", f"{m['duration']:.2f}"),
        ("Total input tokens", m["total_input_tokens"]),
        ("Total generated tokens", m["total_output_tokens"]),
        ("Request throughput (req/s)", f"{m['request_throughput']:.3f}"),
        ("Output token throughput (tok/s)", f"{m['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{m['total_token_throughput']:.2f}"),
        (
            "Mean / median / P99 TTFT (ms)",
            f"{stat('ttft_ms', 'mean')} / {stat('ttft_ms', 'median')} / {stat('ttft_ms', 'p99')}",
        ),
        (
            "Mean / median / P99 TPOT (ms)",
            f"{stat('tpot_ms', 'mean')} / {stat('tpot_ms', 'median')} / {stat('tpot_ms', 'p99')}",
        ),
        (
            "Mean / median / P99 ITL (ms)",
            f"{stat('itl_ms', 'mean')} / {stat('itl_ms', 'median')} / {stat('itl_ms', 'p99')}",
        ),
        (
            "Mean / median / P99 E2E latency (ms)",
            f"{stat('e2el_ms', 'mean')} / {stat('e2el_ms', 'median')} / {stat('e2el_ms', 'p99')}",
        ),
    ]
    if "goodput" in m:
        rows.append(("Goodput (req/s)", f"{m['goodput']:.3f}"))
    if "spec_acceptance_rate" in m:
        rows.append(("Speculation: acceptance rate", f"{m['spec_acceptance_rate']:.3f}"))
        rows.append(("Speculation: mean accepted length", f"{m['spec_mean_accepted_length']:.2f}"))
    if "prefix_cache_hit_rate" in m:
        rows.append(("Prefix cache hit rate (server)", f"{m['prefix_cache_hit_rate']:.3f}"))
    print_table("Benchmark summary", rows)
    print_grid(
        "Percentiles",
        [
            "Percentile",
            "TTFT (s)",
            "ITL (s)",
            "TPOT (s)",
            "Latency (s)",
            "Input tokens",
            "Output tokens",
        ],
        percentile_table(results),
    )
    for err in m["errors"]:
        print(f"error: {err}")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="load-test an OpenAI-compatible server")
    p.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="server root (with or without /v1)"
    )
    p.add_argument(
        "--model", default=None, help="model name to request (default: the server's first)"
    )
    p.add_argument(
        "--endpoint", default="/v1/completions", choices=("/v1/completions", "/v1/chat/completions")
    )
    p.add_argument("--api-key", default=None)
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer for building prompts (default: SmolLM2)"
    )
    p.add_argument(
        "--dataset", default="random", choices=("random", "sharegpt", "prefix-repetition")
    )
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON file")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument(
        "--input-len",
        default="128",
        help="prompt length (random) or question length (prefix-repetition): A:B or N",
    )
    p.add_argument("--output-len", default="128", help="output length range C:D or N")
    p.add_argument(
        "--prefix-len", type=int, default=1024, help="shared prefix tokens (prefix-repetition)"
    )
    p.add_argument(
        "--num-prefixes", type=int, default=1, help="distinct shared prefixes (prefix-repetition)"
    )
    p.add_argument("--max-concurrency", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="most requests in flight; a list (1,4,16) runs a sweep")  # fmt: skip
    p.add_argument(
        "--request-rate", type=float, default=float("inf"), help="requests/s (Poisson) or inf"
    )
    p.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape of arrivals (1 = Poisson)"
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="ask the server to ignore EOS (vLLM/pagellm field)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goodput", default=None, help="SLOs, e.g. ttft:500,tpot:50 (ms)")
    p.add_argument("--request-timeout", type=float, default=6 * 3600)
    p.add_argument("--disconnect-rate", type=float, default=0.0,
                   help="share of requests whose client leaves mid-stream (a soak's disconnects)")  # fmt: skip
    p.add_argument("--duration", type=float, default=0.0,
                   help="seconds: repeat waves of fresh prompts until this long (a soak)")  # fmt: skip
    p.add_argument("--json-schema", default=None,
                   help="constrain every request to this JSON schema file, or 'records' (a "
                   "built-in schema longer than --output-len): structured-output cost")  # fmt: skip
    p.add_argument("--lora-modules", default=None, metavar="NAME,NAME,...",
                   help="spread requests over these model names in turn (LoRA adapters; "
                   "include the base model's name to mix it in)")  # fmt: skip
    p.add_argument("--output-json", default=None)
    p.add_argument("--results-db", default=None, help="SQLite file; each run is appended")
    p.add_argument("--plot-dir", default=None, help="write throughput and latency PNGs here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run)
