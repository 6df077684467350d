"""Benchmark workloads: random token prompts, ShareGPT conversations, shared prefixes."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RandomRequest:
    prompt_token_ids: list[int]
    output_len: int
    prompt: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def parse_range(spec: str | int) -> tuple[int, int]:
    """'32:256' -> (32, 256); '128' -> (128, 128)."""
    s = str(spec)
    try:
        if ":" in s:
            lo, hi = (int(x) for x in s.split(":", 1))
        else:
            lo = hi = int(s)
    except ValueError:
        raise ValueError(f"a length range is A:B or a number, got {spec!r}") from None
    if lo < 1 or hi < lo:
        raise ValueError(f"a length range needs 1 <= A <= B, got {spec!r}")
    return lo, hi


def normal_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that are not special or added tokens (safe to put in random prompts)."""
    vocab = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special.update(int(i) for i in added)
    return [i for i in range(vocab) if i not in special]


def sample_random_token_requests(
    tokenizer: Any,
    num_prompts: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int,
) -> list[RandomRequest]:
    """Prompts of uniformly random ordinary tokens with uniformly drawn lengths."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be at least 1, got {num_prompts}")
    rng = random.Random(seed)
    pool = normal_token_ids(tokenizer)
    out = []
    for _ in range(num_prompts):
        n_in = rng.randint(*input_len)
        n_out = rng.randint(*output_len)
        out.append(RandomRequest([rng.choice(pool) for _ in range(n_in)], n_out))
    return out


def sample_random_text_requests(
    tokenizer: Any,
    num_prompts: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int,
) -> list[RandomRequest]:
    """Random prompts as text whose re-tokenized length equals the drawn length.

    Random ids do not always survive decode -> encode unchanged, so the text is
    re-encoded and trimmed or extended until its length matches (what an HTTP client
    must send: text, not ids).
    """
    rng = random.Random(seed + 1)
    pool = normal_token_ids(tokenizer)
    out = []
    for req in sample_random_token_requests(tokenizer, num_prompts, input_len, output_len, seed):
        ids, n_in = req.prompt_token_ids, req.prompt_len
        for _ in range(8):
            ids = tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)
            if len(ids) == n_in:
                break
            ids = ids[:n_in] + [rng.choice(pool) for _ in range(n_in - len(ids))]
        out.append(RandomRequest(ids, req.output_len, prompt=tokenizer.decode(ids)))
    return out


def load_sharegpt_requests(
    path: str,
    tokenizer: Any,
    num_prompts: int,
    output_len: tuple[int, int] | None,
    seed: int,
    max_prompt_len: int = 1024,
) -> list[RandomRequest]:
    """First human turn -> prompt, first reply's length -> output length (ShareGPT JSON)."""
    with open(path) as f:
        data = json.load(f)
    rng = random.Random(seed)
    rng.shuffle(data)
    out: list[RandomRequest] = []
    for entry in data:
        conv = entry.get("conversations") or entry.get("conversation") or []
        if len(conv) < 2:
            continue
        prompt = conv[0].get("value") or conv[0].get("content") or ""
        reply = conv[1].get("value") or conv[1].get("content") or ""
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        if not ids or len(ids) > max_prompt_len:
            continue
        n_out = (
            rng.randint(*output_len)
            if output_len
            else max(len(tokenizer.encode(reply, add_special_tokens=False)), 4)
        )
        out.append(RandomRequest(ids, n_out, prompt=prompt))
        if len(out) == num_prompts:
            break
    if not out:
        raise ValueError(f"{path} holds no usable ShareGPT conversations")
    return out


def sample_prefix_repetition_requests(
    tokenizer: Any,
    num_prompts: int,
    prefix_len: int,
    suffix_len: tuple[int, int],
    output_len: tuple[int, int],
    num_prefixes: int,
    seed: int,
) -> list[RandomRequest]:
    """Requests sharing one of ``num_prefixes`` long prefixes (a system prompt) plus a short
    random question: the prefix-cache workload."""
    rng = random.Random(seed)
    pool = normal_token_ids(tokenizer)
    prefixes = [
        sample_random_text_requests(
            tokenizer, 1, (prefix_len, prefix_len), (1, 1), seed + 1000 + i
        )[0]
        for i in range(num_prefixes)
    ]
    out = []
    for i in range(num_prompts):
        prefix = prefixes[i % num_prefixes]
        n_suffix = rng.randint(*suffix_len)
        suffix_text = tokenizer.decode([rng.choice(pool) for _ in range(n_suffix)])
        text = (prefix.prompt or "") + suffix_text
        ids = tokenizer.encode(text, add_special_tokens=False)
        out.append(RandomRequest(ids, rng.randint(*output_len), prompt=text))
    return out
