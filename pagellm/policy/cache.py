"""The exact-match response cache: a temperature-0 request seen before (same key, model,
prompt tokens and sampling options) is answered from memory without the model.

Only deterministic requests are kept and served: greedy (temperature 0), one choice, no
logprobs, a reply that ended on its own (stop or length, not a policy stop or an abort).
Entries are scoped by the API key and the model (a base name or a LoRA adapter), expire
after ``ttl_seconds`` and the least recently used leave past ``max_entries``. The text
stored is what was sent (after output redaction).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

from pagellm.policy.config import ResponseCacheConfig

# Options that do not change a greedy reply's tokens, or that the stream sets itself.
_IGNORED = {"output_kind", "seed", "_all_stop_token_ids", "_report_logprobs"}


@dataclass
class CachedReply:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    stored_at: float


def cacheable(params: Any) -> bool:
    return bool(
        params.temperature == 0 and params.n == 1 and (params.best_of or 1) == 1
        and params.logprobs is None and params.prompt_logprobs is None
        and not params.use_beam_search
    )  # fmt: skip


def cache_key(scope: tuple[str, str], prompt_ids: list[int], params: Any) -> str:
    h = hashlib.sha256()
    h.update(repr(scope).encode())
    h.update(repr(list(prompt_ids)).encode())
    for f in fields(params):
        if f.name not in _IGNORED:
            h.update(f"{f.name}={getattr(params, f.name)!r};".encode())
    return h.hexdigest()


class ResponseCache:
    def __init__(self, config: ResponseCacheConfig) -> None:
        self.config = config
        self.entries: OrderedDict[str, CachedReply] = OrderedDict()
        self.hits = self.misses = self.saved_tokens = 0

    def get(self, key: str) -> CachedReply | None:
        reply = self.entries.get(key)
        if reply is not None and time.monotonic() - reply.stored_at > self.config.ttl_seconds:
            del self.entries[key]
            reply = None
        if reply is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        self.saved_tokens += len(reply.token_ids)
        return reply

    def put(self, key: str, reply: CachedReply) -> None:
        self.entries[key] = reply
        self.entries.move_to_end(key)
        while len(self.entries) > self.config.max_entries:
            self.entries.popitem(last=False)

    def render(self) -> list[str]:
        return [
            "# HELP pagellm:response_cache_total Exact-match response cache lookups.",
            "# TYPE pagellm:response_cache_total counter",
            f'pagellm:response_cache_total{{result="hit"}} {self.hits}',
            f'pagellm:response_cache_total{{result="miss"}} {self.misses}',
            "# HELP pagellm:response_cache_saved_tokens_total Output tokens served from "
            "the cache instead of the model.",
            "# TYPE pagellm:response_cache_saved_tokens_total counter",
            f"pagellm:response_cache_saved_tokens_total {self.saved_tokens}",
            "# HELP pagellm:response_cache_entries Replies held.",
            "# TYPE pagellm:response_cache_entries gauge",
            f"pagellm:response_cache_entries {len(self.entries)}",
        ]
