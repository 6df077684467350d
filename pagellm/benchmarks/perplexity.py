"""``pagellm bench perplexity``: how much a quantization method costs in accuracy.

The text is tokenized once and cut into windows of ``--window`` tokens that start every
``--stride`` tokens (the sliding-window evaluation of Hugging Face's perplexity guide):
each token is scored once, in the window where it has the most context before it (all
of the first window's tokens after the first; then each window's last ``window -
stride`` tokens). Its score is the log-probability the engine reports for it as a prompt
token (``prompt_logprobs``), so the model runs exactly as it serves.

    perplexity = exp(-mean log p(token | the tokens before it in its window))

Without ``--text`` it reads the English prose of Python's own documentation topics
(``pydoc_data.topics``), which every Python installation has.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from pagellm.benchmarks.report import machine_info, print_table


@dataclass
class PerplexityResult:
    model: str
    quantization: str
    dtype: str
    kv_cache_dtype: str
    text: str
    num_tokens: int
    num_scored_tokens: int
    window: int
    stride: int
    perplexity: float
    elapsed_s: float
    date: str
    machine: dict[str, Any]


def default_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of each window: every position but the first
    is scored exactly once, with at least ``window - stride`` tokens of context (or all
    of them) before it."""
    if not 1 <= stride < window:
        raise ValueError(f"stride must be between 1 and window - 1 ({window - 1}), got {stride}")
    out = []
    scored_to = 1  # position 0 has no context: never scored
    start = 0
    while scored_to < num_tokens:
        end = min(start + window, num_tokens)
        out.append((start, end, scored_to))
        scored_to = end
        if end == num_tokens:
            break
        start += stride
    return out


def perplexity(llm: Any, token_ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """(perplexity, number of scored tokens) of ``token_ids`` under ``llm``."""
    from pagellm.sampling_params import SamplingParams

    spans = windows(len(token_ids), window, stride)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    outs = llm.generate([token_ids[s:e] for s, e, _ in spans], params, use_tqdm=False)
    total, count = 0.0, 0
    for (start, end, first), out in zip(spans, outs):
        lps = out.prompt_logprobs
        assert lps is not None and len(lps) == end - start
        for pos in range(first, end):
            entry = lps[pos - start]
            assert entry is not None
            total += entry[token_ids[pos]].logprob
            count += 1
    return math.exp(-total / count), count


def run(args: argparse.Namespace) -> int:
    from pagellm.engine.arg_utils import EngineArgs
    from pagellm.entrypoints.llm import LLM

    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text, source = f.read(), args.text
    else:
        text, source = default_text(), "pydoc_data.topics"
    engine_args = EngineArgs.from_cli_args(args)
    engine_args.enable_prefix_caching = False
    # A window is a prompt, and each prompt leaves room for one generated token.
    engine_args.max_model_len = max(args.window + 1, engine_args.max_model_len or 0)
    llm = LLM(**vars(engine_args))
    ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise ValueError("the text has fewer than two tokens")
    start = time.perf_counter()
    ppl, scored = perplexity(llm, ids, args.window, args.stride)
    elapsed = time.perf_counter() - start
    cfg = llm.engine.config
    result = PerplexityResult(
        model=cfg.model.served_model_name,
        quantization=cfg.model.quantization.method,
        dtype=cfg.model.dtype,
        kv_cache_dtype=cfg.cache.kv_cache_dtype,
        text=source,
        num_tokens=len(ids),
        num_scored_tokens=scored,
        window=args.window,
        stride=args.stride,
        perplexity=ppl,
        elapsed_s=elapsed,
        date=time.strftime("%Y-%m-%d %H:%M"),
        machine=machine_info(),
    )
    print_table(
        "Perplexity",
        [
            ("Model", result.model),
            (
                "Quantization / dtype / KV",
                f"{result.quantization} / {result.dtype} / {result.kv_cache_dtype}",
            ),
            ("Text", source),
            ("Tokens (scored)", f"{len(ids)} ({scored})"),
            ("Window / stride", f"{args.window} / {args.stride}"),
            ("Perplexity", f"{ppl:.4f}"),
            ("Elapsed (s)", f"{elapsed:.1f}"),
        ],
    )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(asdict(result), f, indent=2)
    return 0


def add_parser(sub: Any) -> None:
    from pagellm.engine.arg_utils import EngineArgs

    p = sub.add_parser("perplexity", help="perplexity of a text (sliding window), per quantization")
    p.add_argument("--text", default=None, help="UTF-8 text file (default: Python's doc topics)")
    p.add_argument("--window", type=int, default=512, help="tokens per window")
    p.add_argument("--stride", type=int, default=256, help="tokens between window starts")
    p.add_argument("--max-tokens", type=int, default=16384, help="score at most this many tokens")
    p.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(p)
    p.set_defaults(handler=run)
