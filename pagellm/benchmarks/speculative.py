"""``pagellm bench speculative``: decode speed on workloads where speculation matters,
with the engine options given (run it once with ``--speculative-config`` and once
without, each in its own process, and compare).

Workloads (chat prompts through the model's template, greedy, EOS honoured):

- ``edit``: rewrite a piece of code or text with a small change and print all of it; the
  answer repeats most of the prompt, which n-gram lookup proposes;
- ``text``: ordinary prose on a topic (what a draft model is for).

For each batch size B, B distinct requests run together; reported per batch size:
mean TPOT (after the first token), decode tokens/s (batch 1: 1000 / TPOT; otherwise all
tokens after the first ones over the time from the last first token to the end), output
tokens per request, and the speculation counters (acceptance rate, mean accepted length).
Medians over ``--num-iters``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Any

_CODE = [
    """def load_users(path):
    users = []
    with open(path) as f:
        for line in f:
            name, age, city = line.strip().split(",")
            users.append({"name": name, "age": int(age), "city": city})
    return users


def adults(users):
    result = []
    for user in users:
        if user["age"] >= 18:
            result.append(user)
    return result


def by_city(users):
    groups = {}
    for user in users:
        groups.setdefault(user["city"], []).append(user)
    return groups
""",
    """class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, word):
        if word in self.counts:
            self.counts[word] += 1
        else:
            self.counts[word] = 1

    def top(self, n):
        items = sorted(self.counts.items(), key=lambda kv: kv[1], reverse=True)
        return items[:n]

    def total(self):
        return sum(self.counts.values())
""",
    """function formatPrice(amount, currency) {
  const rounded = Math.round(amount * 100) / 100;
  if (currency === "EUR") {
    return rounded.toFixed(2) + " EUR";
  }
  if (currency === "USD") {
    return "$" + rounded.toFixed(2);
  }
  return rounded.toFixed(2) + " " + currency;
}

function total(items) {
  let sum = 0;
  for (const item of items) {
    sum += item.price * item.quantity;
  }
  return sum;
}
""",
    """SELECT customers.name, orders.id, orders.total
FROM customers
JOIN orders ON orders.customer_id = customers.id
WHERE orders.total > 100
  AND orders.created_at >= '2024-01-01'
ORDER BY orders.total DESC
LIMIT 20;
""",
]
_EDITS = [
    "Rename the variable `users` to `people` everywhere",
    "Rename the method `add` to `push`",
    "Rename the variable `rounded` to `value`",
    "Change the limit from 20 to 50",
]
_TOPICS = [
    "how bread is made", "the history of the bicycle", "why the sky is blue",
    "how to plant a tree", "the life of honey bees", "how a steam engine works",
    "the rules of chess", "how rain forms", "the first trip to the moon",
    "how to learn a new language", "the invention of paper", "what volcanoes are",
    "how computers store numbers", "the water cycle", "how birds migrate",
    "the oldest cities in the world",
]  # fmt: skip


def workload_messages(name: str, n: int) -> list[list[dict[str, str]]]:
    """n chat conversations of the workload (cycling through its prompts)."""
    out = []
    for i in range(n):
        if name == "edit":
            j = i % len(_CODE)
            content = (
                f"{_EDITS[j]} in the following code. Reply with the complete updated code "
                f"and nothing else.\n\n{_CODE[j]}"
            )
            if i >= len(_CODE):
                content += f"\n(version {i // len(_CODE)})"
        elif name == "text":
            content = f"Write a detailed paragraph about {_TOPICS[i % len(_TOPICS)]}."
            if i >= len(_TOPICS):
                content += f" (Take {i // len(_TOPICS)}.)"
        else:
            raise ValueError(f"unknown workload {name!r} (edit, text)")
        out.append([{"role": "user", "content": content}])
    return out


def run(args: argparse.Namespace) -> int:
    from pagellm.benchmarks.report import machine_info
    from pagellm.engine.arg_utils import EngineArgs
    from pagellm.entrypoints.llm import LLM
    from pagellm.sampling_params import SamplingParams

    llm = LLM(**dataclasses.asdict(EngineArgs.from_cli_args(args)))
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    rows = []
    print(f"workload={args.workload} speculative_config={args.speculative_config}")
    print(f"{'batch':>5} {'TPOT ms':>8} {'decode tok/s':>12} {'out tok/req':>11} "
          f"{'accept':>7} {'mean len':>8}")  # fmt: skip
    for bs in args.batch_sizes:
        convs = workload_messages(args.workload, bs)
        llm.chat(convs[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        tpots, rates, outs, accs, lens = [], [], [], [], []
        for _ in range(args.num_iters):
            results = llm.chat(convs, sp, use_tqdm=False)
            ms = [r.metrics for r in results if r.metrics is not None]
            n_out = [len(r.outputs[0].token_ids) for r in results]
            tpot = [
                (m.last_token_time - m.first_token_time) / (n - 1)
                for m, n in zip(ms, n_out)
                if n > 1 and m.last_token_time is not None and m.first_token_time is not None
            ]
            start = max(m.first_token_time or 0.0 for m in ms)
            end = max(m.last_token_time or 0.0 for m in ms)
            tpots.append(statistics.mean(tpot) * 1e3)
            rates.append(
                1e3 / tpots[-1] if bs == 1 else sum(n - 1 for n in n_out) / max(end - start, 1e-9)
            )
            outs.append(statistics.mean(n_out))
            drafts = sum(m.spec_num_draft_tokens for m in ms)
            steps = sum(m.spec_num_drafts for m in ms)
            accepted = sum(m.spec_num_accepted_tokens for m in ms)
            accs.append(accepted / drafts if drafts else 0.0)
            lens.append(1 + accepted / steps if steps else 1.0)
        row = {
            "batch_size": bs,
            "tpot_ms": statistics.median(tpots),
            "decode_tok_s": statistics.median(rates),
            "output_tokens_per_request": statistics.median(outs),
            "acceptance_rate": statistics.median(accs),
            "mean_accepted_length": statistics.median(lens),
        }
        rows.append(row)
        print(f"{bs:>5} {row['tpot_ms']:>8.2f} {row['decode_tok_s']:>12.1f} "
              f"{row['output_tokens_per_request']:>11.0f} {row['acceptance_rate']:>7.2f} "
              f"{row['mean_accepted_length']:>8.2f}")  # fmt: skip
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(
                {"machine": machine_info(), "workload": args.workload, "time": time.time(),
                 "speculative_config": args.speculative_config, "rows": rows}, f, indent=2,
            )  # fmt: skip
    return 0


def add_parser(sub: Any) -> None:
    from pagellm.engine.arg_utils import EngineArgs

    p = sub.add_parser(
        "speculative", help="decode speed on editing / prose workloads (with or without "
        "--speculative-config)",
    )  # fmt: skip
    EngineArgs.add_cli_args(p)
    p.add_argument("--workload", choices=("edit", "text"), default="edit")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--output-json", default=None)
    p.set_defaults(handler=run)
