"""The exact-match response cache: a temperature-0 request seen before (same key, model,
prompt tokens and sampling options) is answered from memory without the model.

Only deterministic requests are kept and served: greedy (temperature 0), one choice, no
logprobs, a reply that ended on its own (stop or length, not a policy stop or an abort).
Entries are scoped by the API key and the model (a base name or a LoRA adapter), expire
after ``ttl_seconds`` and the least recently used leave past ``max_entries``. The text
stored is what was sent (after output redaction).

With ``semantic:`` a miss is looked up again by meaning (pagellm.policy.semantic): the
replies of one *bucket* (key, model and sampling options: everything but the prompt)
are indexed by the embedding of their question, and the nearest one answers when its
cosine reaches the threshold. Exact first (a hash), then the vectors.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from pagellm.policy.config import ResponseCacheConfig
from pagellm.policy.semantic import FaissIndex, NumpyIndex, make_index

# Options that do not change a greedy reply's tokens, or that the stream sets itself.
_IGNORED = {"output_kind", "seed", "_all_stop_token_ids", "_report_logprobs"}


@dataclass
class CachedReply:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    stored_at: float
    bucket: str | None = None  # set when the reply is in a semantic index


def cacheable(params: Any) -> bool:
    return bool(
        params.temperature == 0 and params.n == 1 and (params.best_of or 1) == 1
        and params.logprobs is None and params.prompt_logprobs is None
        and not params.use_beam_search
    )  # fmt: skip


def bucket_key(scope: tuple[str, str], params: Any) -> str:
    """Everything that must match besides the prompt: key, model, sampling options."""
    h = hashlib.sha256()
    h.update(repr(scope).encode())
    for f in fields(params):
        if f.name not in _IGNORED:
            h.update(f"{f.name}={getattr(params, f.name)!r};".encode())
    return h.hexdigest()


def cache_key(bucket: str, prompt_ids: list[int]) -> str:
    return hashlib.sha256(f"{bucket}:{list(prompt_ids)!r}".encode()).hexdigest()


class ResponseCache:
    def __init__(self, config: ResponseCacheConfig) -> None:
        self.config = config
        self.entries: OrderedDict[str, CachedReply] = OrderedDict()
        self.indexes: dict[str, NumpyIndex | FaissIndex] = {}  # bucket -> its vectors
        self.hits = {"exact": 0, "semantic": 0}
        self.misses = self.saved_tokens = self.embed_errors = 0

    def _expired(self, reply: CachedReply) -> bool:
        return time.monotonic() - reply.stored_at > self.config.ttl_seconds

    def _drop(self, key: str) -> None:
        reply = self.entries.pop(key)
        if reply.bucket is not None:
            index = self.indexes[reply.bucket]
            index.remove(key)
            if not len(index):
                del self.indexes[reply.bucket]

    def _hit(self, key: str, reply: CachedReply, match: str) -> CachedReply:
        self.entries.move_to_end(key)
        self.hits[match] += 1
        self.saved_tokens += len(reply.token_ids)
        return reply

    def get(self, key: str) -> CachedReply | None:
        """The exact match (no miss is counted: a semantic lookup may follow)."""
        reply = self.entries.get(key)
        if reply is not None and self._expired(reply):
            self._drop(key)
            reply = None
        return None if reply is None else self._hit(key, reply, "exact")

    def nearest(
        self, bucket: str, vector: np.ndarray, threshold: float
    ) -> tuple[CachedReply, float] | None:
        """The reply whose question is nearest ``vector`` in the bucket, if its cosine
        reaches ``threshold`` (expired replies met on the way are dropped)."""
        while True:
            index = self.indexes.get(bucket)
            found = index.search(vector) if index is not None else None
            if found is None or found[1] < threshold:
                return None
            key, score = found
            reply = self.entries[key]
            if not self._expired(reply):
                return self._hit(key, reply, "semantic"), score
            self._drop(key)

    def miss(self) -> None:
        self.misses += 1

    def put(self, key: str, reply: CachedReply, vector: np.ndarray | None = None) -> None:
        if key in self.entries:
            self._drop(key)
        if vector is not None and reply.bucket is not None:
            index = self.indexes.get(reply.bucket)
            if index is None or index.dim != vector.shape[0]:  # the embedder changed
                if index is not None:
                    for k in index.members():  # their vectors are of another model
                        self.entries[k].bucket = None
                index = self.indexes[reply.bucket] = make_index(
                    self.config.semantic.index if self.config.semantic else "auto",
                    vector.shape[0],
                )  # fmt: skip
            index.add(key, vector)
        else:
            reply.bucket = None
        self.entries[key] = reply
        while len(self.entries) > self.config.max_entries:
            self._drop(next(iter(self.entries)))

    def render(self) -> list[str]:
        return [
            "# HELP pagellm:response_cache_total Exact-match response cache lookups.",
            "# TYPE pagellm:response_cache_total counter",
            f'pagellm:response_cache_total{{result="hit",match="exact"}} {self.hits["exact"]}',
            f'pagellm:response_cache_total{{result="hit",match="semantic"}} '
            f"{self.hits['semantic']}",
            f'pagellm:response_cache_total{{result="miss",match=""}} {self.misses}',
            "# HELP pagellm:semantic_cache_embed_errors_total Lookups that ran uncached "
            "because the embedding failed.",
            "# TYPE pagellm:semantic_cache_embed_errors_total counter",
            f"pagellm:semantic_cache_embed_errors_total {self.embed_errors}",
            "# HELP pagellm:response_cache_saved_tokens_total Output tokens served from "
            "the cache instead of the model.",
            "# TYPE pagellm:response_cache_saved_tokens_total counter",
            f"pagellm:response_cache_saved_tokens_total {self.saved_tokens}",
            "# HELP pagellm:response_cache_entries Replies held.",
            "# TYPE pagellm:response_cache_entries gauge",
            f"pagellm:response_cache_entries {len(self.entries)}",
        ]
