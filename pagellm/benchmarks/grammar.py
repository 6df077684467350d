"""`pagellm bench grammar`: what each structured-output backend costs on this tokenizer.

For every backend (pagellm's adapters in core.structured_output, the same code the engine
runs) and every JSON schema of a set (default: the 20 of ``benchmarks.schemas``):

- tokenizer setup once, grammar compilation per schema (no cache);
- along one token path per schema, the time to fill the next-token mask and accept the
  token, per token. The path is drawn from the first backend's masks (a random allowed
  token among the first 50, EOS only when nothing else is allowed), and every backend
  walks the same path, so they do the same work.

This is the grammar engine alone; `bench serve --json-schema` measures the end-to-end
TPOT cost through the server.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def run(args: argparse.Namespace) -> int:
    from pagellm.benchmarks.report import machine_info
    from pagellm.benchmarks.schemas import SCHEMAS
    from pagellm.core.structured_output import (
        StructuredOutputManager,
        StructuredOutputsParams,
        available_backends,
    )
    from pagellm.engine.arg_utils import EngineArgs
    from pagellm.engine.tokenizer import load_tokenizer

    backends = args.backends.split(",")
    missing = [b for b in backends if b not in available_backends()]
    if missing:
        raise ValueError(f"backend(s) {missing} not installed; available: {available_backends()}")
    schemas: list[Any] = SCHEMAS
    if args.schemas:
        with open(args.schemas) as f:
            schemas = json.load(f)
    mc = EngineArgs(model=args.model).create_engine_config().model
    tokenizer = load_tokenizer(mc.tokenizer, mc.chat_template)
    vocab = int(mc.hf_config.vocab_size)
    eos = set(mc.eos_token_ids)
    words = (vocab + 31) // 32
    rng = np.random.default_rng(args.seed)
    manager = StructuredOutputManager(lambda: tokenizer, vocab, mc.eos_token_ids, backends[0])
    results: dict[str, dict[str, Any]] = {}
    impls = {}
    for name in backends:
        t = time.perf_counter()
        impls[name] = manager.get_backend(name)
        results[name] = {
            "setup_ms": (time.perf_counter() - t) * 1e3,
            "compile_ms": [],
            "token_us": [],
        }
    for schema in schemas:
        params = StructuredOutputsParams(json=schema)
        matchers = {}
        for name, impl in impls.items():
            t = time.perf_counter()
            compiled = impl.compile(params)
            results[name]["compile_ms"].append((time.perf_counter() - t) * 1e3)
            matchers[name] = impl.new_matcher(compiled)
        mask = np.zeros((1, words), dtype=np.int32)
        for _ in range(args.tokens):
            token = None
            for name, impl in impls.items():
                m = matchers[name]
                t = time.perf_counter()
                impl.fill(m, mask, 0)
                if token is None:  # the first backend draws the path
                    bits = np.unpackbits(mask[0].view(np.uint8), bitorder="little")[:vocab]
                    allowed = [int(a) for a in np.flatnonzero(bits) if int(a) not in eos]
                    if not allowed:
                        break
                    token = int(rng.choice(allowed[:50]))
                    t = time.perf_counter() - t
                    t0 = time.perf_counter()
                    ok = impl.accept(m, token)
                    elapsed = t + time.perf_counter() - t0
                else:
                    ok = impl.accept(m, token)
                    elapsed = time.perf_counter() - t
                if not ok:
                    raise RuntimeError(f"{name} rejected token {token} that {backends[0]} allowed")
                results[name]["token_us"].append(elapsed * 1e6)
            if token is None:
                break
    summary = {}
    for name, r in results.items():
        c, s = r["compile_ms"], r["token_us"]
        summary[name] = {
            "tokenizer_setup_ms": round(r["setup_ms"], 1),
            "compile_ms_median": round(statistics.median(c), 3),
            "compile_ms_max": round(max(c), 3),
            "token_us_median": round(statistics.median(s), 1),
            "token_us_mean": round(statistics.mean(s), 1),
            "token_us_p90": round(_percentile(s, 90), 1),
            "token_us_p99": round(_percentile(s, 99), 1),
            "tokens": len(s),
            "schemas": len(c),
        }
    print(
        f"{'backend':12} {'setup ms':>9} {'compile ms p50/max':>20} {'mask+accept us p50/mean/p90/p99':>34}"
    )
    for name, s in summary.items():
        print(f"{name:12} {s['tokenizer_setup_ms']:9.0f} "
              f"{s['compile_ms_median']:9.2f} / {s['compile_ms_max']:8.2f} "
              f"{s['token_us_median']:8.0f} / {s['token_us_mean']:6.0f} / {s['token_us_p90']:6.0f} / {s['token_us_p99']:6.0f}")  # fmt: skip
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"backends": summary, "machine": machine_info()}, f, indent=2)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "grammar", help="structured-output backends: compile and per-token mask cost"
    )
    p.add_argument("--backends", default="llguidance,xgrammar",
                   help="comma-separated; the first draws the token path")  # fmt: skip
    p.add_argument("--schemas", default=None, help="JSON file with a list of schemas")
    p.add_argument("--tokens", type=int, default=80, help="most tokens walked per schema")
    p.add_argument("--model", default=None, help="model whose tokenizer is used")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.set_defaults(handler=run)
