"""The semantic cache, routing and leak pieces on their own: the vector indexes (numpy
and FAISS agree), the cache's buckets, thresholds, TTL and LRU over its vectors, the
prompt-leak matcher across stream pieces, the cascade's score and the new sections'
errors in the policy file."""

from __future__ import annotations

import random
import re
import time
from typing import Any

import numpy as np
import pytest

from pagellm.outputs import CompletionOutput, Logprob
from pagellm.policy.cache import CachedReply, ResponseCache, bucket_key, cache_key
from pagellm.policy.config import PolicyError, ResponseCacheConfig, load_policy
from pagellm.policy.guard import StreamFilter, leak_rule
from pagellm.policy.routing import mean_logprob
from pagellm.policy.semantic import FaissIndex, NumpyIndex, _unit, make_index
from pagellm.sampling_params import SamplingParams


def _vectors(n: int, dim: int = 32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [_unit(rng.normal(size=dim)) for _ in range(n)]


def test_numpy_and_faiss_indexes_agree_through_adds_and_removes() -> None:
    vecs = _vectors(60)
    queries = _vectors(20, seed=1)
    indexes = [NumpyIndex(32), FaissIndex(32)]
    for i, v in enumerate(vecs):
        for ix in indexes:
            ix.add(f"k{i}", v)
    for i in range(0, 60, 3):
        for ix in indexes:
            ix.remove(f"k{i}")
    for q in queries:
        (ka, sa), (kb, sb) = (ix.search(q) for ix in indexes)  # type: ignore[misc]
        assert ka == kb and abs(sa - sb) < 1e-5
        brute = max((float(v @ q), f"k{i}") for i, v in enumerate(vecs) if i % 3)
        assert ka == brute[1] and abs(sa - brute[0]) < 1e-5
    assert len(indexes[0]) == len(indexes[1]) == 40
    assert sorted(indexes[0].members()) == sorted(indexes[1].members())
    assert NumpyIndex(4).search(_unit([1, 0, 0, 0])) is None
    assert isinstance(make_index("numpy", 8), NumpyIndex)
    assert isinstance(make_index("auto", 8), FaissIndex)  # faiss-cpu is a dev dependency


def _reply(text: str, bucket: str | None) -> CachedReply:
    return CachedReply(text, [1, 2, 3], "stop", None, time.monotonic(), bucket)


def test_cache_buckets_thresholds_ttl_and_lru() -> None:
    cache = ResponseCache(ResponseCacheConfig(ttl_seconds=600, max_entries=3))
    params = SamplingParams(temperature=0.0, max_tokens=8)
    alice, bob = bucket_key(("sk-a", "m"), params), bucket_key(("sk-b", "m"), params)
    assert alice != bob
    assert alice != bucket_key(("sk-a", "m"), SamplingParams(temperature=0.0, max_tokens=9))
    v = _vectors(4)
    near = _unit(v[0] + 0.05 * v[1])
    cache.put(cache_key(alice, [1]), _reply("one", alice), v[0])
    # Exact first, then the nearest vector above the threshold, in its own bucket only.
    assert cache.get(cache_key(alice, [1])) is not None
    found = cache.nearest(alice, near, 0.9)
    assert found is not None and found[0].text == "one" and found[1] > 0.99
    assert cache.nearest(alice, near, 0.9999) is None
    assert cache.nearest(bob, near, 0.0) is None
    assert cache.hits == {"exact": 1, "semantic": 1}
    # LRU: the fourth entry pushes out the oldest, and its vector with it.
    for i in (2, 3, 4):
        cache.put(cache_key(alice, [i]), _reply(f"r{i}", alice), v[i - 1])
    assert len(cache.entries) == 3 and cache.get(cache_key(alice, [1])) is None
    assert cache.nearest(alice, v[0], 0.999) is None
    assert len(cache.indexes[alice]) == 3
    # Expired replies are dropped when met, exact or by vector.
    for reply in cache.entries.values():
        reply.stored_at -= 601
    assert cache.nearest(alice, v[1], -1.0) is None
    assert not cache.entries and alice not in cache.indexes
    # A reply stored without a vector is an exact entry only.
    cache.put(cache_key(bob, [9]), _reply("plain", bob))
    assert cache.entries[cache_key(bob, [9])].bucket is None and bob not in cache.indexes


def test_prompt_leak_is_caught_in_any_pieces() -> None:
    system = "You are Orbit, the support bot of Acme. The discount code is ZX-4471-Q; never say it."
    rule = leak_rule(system, 24, "block")
    leaked = "Sure! " + system[20:70] + " and more text that is fine."
    rng = random.Random(0)
    for _ in range(50):
        f = StreamFilter((rule,), 64)
        out, pos, blocked = "", 0, False
        while pos < len(leaked):
            step = rng.randint(1, 7)
            v = f.feed(leaked[pos : pos + step], final=pos + step >= len(leaked))
            pos += step
            out += v.text
            if v.blocked is not None:
                blocked = True
                break
        assert blocked and out == "Sure! " and "ZX-4471" not in out
    # Short echoes of the prompt ("the support") are not leaks.
    f = StreamFilter((rule,), 64)
    v = f.feed("I am the support bot of a company.", final=True)
    assert v.blocked is None and v.text == "I am the support bot of a company."
    redact = StreamFilter((leak_rule(system, 24, "redact"),), 64)
    assert redact.feed(leaked, final=True).text.startswith("Sure! [SYSTEM PROMPT] and more")


def test_cascade_score_is_the_mean_sampled_logprob() -> None:
    out = CompletionOutput(0, "ab", [5, 6], None, [
        {5: Logprob(-0.5, 1), 9: Logprob(-2.0, 2)}, {6: Logprob(-1.5, 1)},
    ])  # fmt: skip
    assert mean_logprob(out) == pytest.approx(-1.0)
    assert mean_logprob(CompletionOutput(0, "", [], None, [])) == float("-inf")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("response_cache:\n  semantic:\n    threshold: 0.9\n",
         "line 3: response_cache.semantic needs an embedding"),
        ("response_cache:\n  semantic:\n    embedding: {url: ftp://x}\n",
         "line 3: url must start with http"),
        ("response_cache:\n  semantic:\n    embedding: {model: m, template: plain}\n",
         "line 3: template must contain {text}"),
        ("response_cache:\n  semantic:\n    embedding: {model: m}\n    index: annoy\n",
         "line 4: index must be one of auto, numpy, faiss"),
        ("routes:\n  - name: r\n    small: a\n    large: b\n    by: coin\n",
         "line 5: by must be one of length, match, cascade"),
        ("routes:\n  - name: r\n    small: a\n    large: b\n    by: match\n",
         "line 2: route 'r': give exactly one of words or regex"),
        ("routes:\n  - name: r\n    small: a\n", "line 2: routes[0] needs a name, a small"),
        ("routes:\n  - {name: r, small: r, large: b}\n", "cannot route to itself"),
        ("routes:\n  - {name: r, small: a, large: b, min_mean_logprob: 2}\n",
         "min_mean_logprob must be a number in [-100.0, 0.0]"),
        ("guardrails:\n  classifier:\n    stage: input\n", "line 3: guardrails.classifier needs a model"),
        ("guardrails:\n  prompt_leak:\n    min_chars: 3\n", "line 3: min_chars must be an integer >= 8"),
    ],
)  # fmt: skip
def test_new_sections_name_the_line_of_a_mistake(tmp_path: Any, text: str, message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=re.escape(message)):
        load_policy(str(path))
