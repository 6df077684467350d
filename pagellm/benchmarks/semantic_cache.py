"""`pagellm bench semantic-cache`: how the serving policy's semantic response cache does
on paraphrased questions (``benchmarks.paraphrases``: 50 pairs and 20 near misses).

For each threshold a server is started with a policy whose only section is
``response_cache.semantic`` (embedding model: the served model unless ``--embedding-url``),
and, one request at a time, streamed, greedy:

1. the 50 questions (misses: each is embedded, looked up, run and stored);
2. the 50 paraphrases: a hit whose answer is its own question's is right, a hit with
   another question's answer is a wrong hit;
3. the 20 near misses (same topic, another question) with ``x-pagellm-cache: skip``
   (no embedding, no lookup: fresh prompts of the same kind, the TTFT a miss would have
   without the cache), then again normally: every hit is a wrong hit.

It prints hit rate, wrong-hit rate and the TTFT and end-to-end time of hits, misses and
uncached requests (medians).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any


def _start(args: argparse.Namespace, threshold: float, port: int) -> tuple[Any, str]:
    emb = (f"{{url: {args.embedding_url}, model: {args.embedding_model}}}" if args.embedding_url
           else f"{{model: {args.embedding_model or args.served_name}}}")  # fmt: skip
    policy = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)  # noqa: SIM115
    policy.write(f"response_cache:\n  semantic:\n    embedding: {emb}\n"
                 f"    threshold: {threshold}\n")  # fmt: skip
    policy.close()
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)  # noqa: SIM115
    cmd = [sys.executable, "-m", "pagellm.entrypoints.cli", "serve", "--port", str(port),
           "--policy", policy.name, *args.serve_args.split()]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return proc, log.name


def _wait(url: str, proc: Any, log: str, timeout: float = 300) -> str:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log) as f:
                raise RuntimeError(f"the server exited:\n{f.read()[-2000:]}")
        try:
            models = httpx.get(f"{url}/v1/models", timeout=2).json()
            return str(models["data"][0]["id"])
        except (httpx.HTTPError, KeyError, ValueError):
            time.sleep(0.5)
    raise RuntimeError("the server did not start")


def _ask(client: Any, url: str, model: str, question: str, max_tokens: int,
         skip: bool = False) -> dict[str, Any]:  # fmt: skip
    body = {"model": model, "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}  # fmt: skip
    headers = {"x-pagellm-cache": "skip"} if skip else {}
    t0 = time.perf_counter()
    ttft, text = None, ""
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        cache = r.headers.get("x-pagellm-cache")
        similarity = r.headers.get("x-pagellm-cache-similarity")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or []
            piece = choices[0]["delta"].get("content") if choices else None
            if piece:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text += piece
    e2e = time.perf_counter() - t0
    return {"hit": cache == "hit", "text": text, "similarity": similarity, "e2e_ms": 1000 * e2e,
            "ttft_ms": 1000 * (ttft if ttft is not None else e2e)}  # fmt: skip


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def measure(args: argparse.Namespace, threshold: float, port: int) -> dict[str, Any]:
    import httpx

    from pagellm.benchmarks.paraphrases import NEAR_MISSES, PAIRS

    url = f"http://127.0.0.1:{port}"
    proc, log = _start(args, threshold, port)
    try:
        model = _wait(url, proc, log)
        with httpx.Client(timeout=300) as c:
            _ask(c, url, model, "Hello!", args.max_tokens, skip=True)  # warm-up
            first = [_ask(c, url, model, q, args.max_tokens) for q, _ in PAIRS]
            para = [_ask(c, url, model, p, args.max_tokens) for _, p in PAIRS]
            plain = [_ask(c, url, model, q, args.max_tokens, skip=True) for q in NEAR_MISSES]
            near = [_ask(c, url, model, q, args.max_tokens) for q in NEAR_MISSES]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        os.unlink(log)
    right = sum(1 for a, p in zip(first, para) if p["hit"] and p["text"] == a["text"])
    wrong_para = sum(1 for a, p in zip(first, para) if p["hit"] and p["text"] != a["text"])
    wrong_near = sum(1 for n in near if n["hit"])
    hits = [p for p in para if p["hit"]] + [n for n in near if n["hit"]]
    return {
        "threshold": threshold,
        "paraphrase_hits": right + wrong_para,
        "paraphrase_hit_rate": round((right + wrong_para) / len(PAIRS), 3),
        "right_hits": right,
        "wrong_paraphrase_hits": wrong_para,
        "near_miss_hits": wrong_near,
        "wrong_hit_rate": round((wrong_para + wrong_near) / max(1, len(hits)), 3),
        "ttft_hit_ms_p50": _median([h["ttft_ms"] for h in hits]),
        "ttft_miss_ms_p50": _median([a["ttft_ms"] for a in first if not a["hit"]]),
        "ttft_uncached_ms_p50": _median([a["ttft_ms"] for a in plain]),
        "e2e_hit_ms_p50": _median([h["e2e_ms"] for h in hits]),
        "e2e_uncached_ms_p50": _median([a["e2e_ms"] for a in plain]),
    }


def run(args: argparse.Namespace) -> int:
    from pagellm.benchmarks.report import machine_info
    from pagellm.utils import get_open_port

    results = []
    for threshold in (float(x) for x in args.thresholds.split(",")):
        r = measure(args, threshold, get_open_port())
        results.append(r)
        print(json.dumps(r))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"machine": machine_info(), "results": results}, f, indent=2)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "semantic-cache",
        help="the policy's semantic cache on 50 paraphrase pairs and 20 near misses",
    )
    p.add_argument("--model", default=None, help="the model to serve (default: pagellm's)")
    p.add_argument("--served-name", default="SmolLM2-135M-Instruct",
                   help="its served name (the embedding model by default)")  # fmt: skip
    p.add_argument("--thresholds", default="0.97", help="comma-separated cosine thresholds")
    p.add_argument("--embedding-model", default=None)
    p.add_argument("--embedding-url", default=None, help="another server's /v1 for embeddings")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--serve-args", default="--max-model-len 1024",
                   help="more `pagellm serve` arguments, as one string")  # fmt: skip
    p.add_argument("--output-json", default=None)
    p.set_defaults(handler=run)
