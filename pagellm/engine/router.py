"""Data-parallel replicas: which engine core serves a request.

With ``--data-parallel-size N`` one API process drives N engine cores (each with its own
workers, KV cache and scheduler; pagellm.engine.async_llm). For every new request the
router scores the live replicas and takes the cheapest::

    cost(i) = load(i)                      tokens the replica holds (running + waiting,
                                           as it last reported, plus requests sent since)
            + prompt tokens - cached(i)    the prefill it would still have to compute
            + lora_miss_cost               if the request's adapter is not loaded there

so a replica whose prefix cache holds the prompt's first blocks wins unless it is busier
by more than the tokens it would save; with no hit anywhere the least loaded replica wins
(ties: the one picked longest ago, so that equal replicas alternate). A session key
(``X-Session-ID`` header, ``prompt_cache_key`` or ``user``) pins a conversation to the
replica that served its first turn while that replica lives.

``cached(i)`` comes from the replica itself: each engine core reports the block hashes it
caches and evicts every step (vLLM's KV events; pagellm.core.block_pool), keyed exactly
as its KV manager keys them (chained sha256 of full blocks, with the cache salt and
adapter). A prompt routed to a replica counts as cached there at once ("pending", for
``pending_ttl`` seconds or until the replica reports it), so a burst of requests sharing a
system prompt lands together before the first prefill finishes. Without events (Ray
Serve replicas: pagellm.integrations.ray_serve) the pending entries are the whole index:
routing history, bounded by ``capacity`` blocks per replica, evicted least recently used.

It lives in engine/ although DESIGN.md's map puts it in entrypoints/: AsyncLLM builds
and drives it, and imports point down the layers (the API layer only supplies the
session key, pagellm.engine.async_llm.session_key).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pagellm.config import EngineConfig
from pagellm.core.block_pool import BlockHash, hash_block_tokens

_HASH_BYTES = 32  # sha256; the KV manager suffixes a group index for sliding-window groups


def prompt_block_hashes(
    token_ids: Sequence[int], block_size: int, cache_key: object = None
) -> list[BlockHash]:
    """The chained hashes of a prompt's full blocks, as the KV manager computes them."""
    out: list[BlockHash] = []
    parent: BlockHash | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size], cache_key)
        out.append(parent)
    return out


class PrefixIndex:
    """What one replica's prefix cache holds: hashes it reported (exact) and hashes of
    prompts just sent to it (pending: expire after ``pending_ttl``, None: never)."""

    def __init__(self, capacity: int = 1 << 20, pending_ttl: float | None = 30.0) -> None:
        self.capacity = capacity
        self.pending_ttl = pending_ttl
        self._stored: set[BlockHash] = set()
        self._pending: OrderedDict[BlockHash, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._stored) + len(self._pending)

    def apply_events(self, stored: Iterable[BlockHash], removed: Iterable[BlockHash]) -> None:
        for h in stored:
            if len(h) == _HASH_BYTES:
                self._stored.add(h)
                self._pending.pop(h, None)
        for h in removed:
            self._stored.discard(h)

    def add_pending(self, hashes: Iterable[BlockHash], now: float) -> None:
        expiry = float("inf") if self.pending_ttl is None else now + self.pending_ttl
        for h in hashes:
            if h in self._stored:
                continue
            self._pending[h] = expiry
            self._pending.move_to_end(h)
        while len(self._pending) > self.capacity:
            self._pending.popitem(last=False)

    def match(self, hashes: Sequence[BlockHash], now: float) -> int:
        """How many leading blocks of ``hashes`` this replica holds."""
        n = 0
        for h in hashes:
            if h in self._stored:
                n += 1
                continue
            expiry = self._pending.get(h)
            if expiry is None:
                break
            if expiry < now:
                del self._pending[h]
                break
            self._pending.move_to_end(h)  # recently used: evicted last
            n += 1
        return n

    def clear(self) -> None:
        self._stored.clear()
        self._pending.clear()


@dataclass
class RouteDecision:
    engine: int
    reason: str
    """prefix (a cache hit decided it), load, lora, session or only (one replica left)."""
    cached_tokens: int = 0


@dataclass
class RouterStats:
    decisions: dict[str, int] = field(default_factory=dict)
    routed_prompt_tokens: int = 0
    expected_cached_tokens: int = 0


class Router:
    """Cache-aware, load-aware, LoRA-aware and session-sticky choice of a replica.

    Not thread-safe: the API process calls it from its event loop (``route``) and hands
    it each replica's KV events there too (``record_kv_events``)."""

    def __init__(
        self,
        num_engines: int,
        block_size: int,
        *,
        lora_miss_cost: int = 256,
        max_loras_per_engine: int = 1,
        pending_ttl: float | None = 30.0,
        capacity_blocks: int = 1 << 20,
        max_sessions: int = 100_000,
    ) -> None:
        if num_engines < 1:
            raise ValueError(f"num_engines must be at least 1, got {num_engines}")
        self.num_engines = num_engines
        self.block_size = block_size
        self.lora_miss_cost = lora_miss_cost
        self.max_loras_per_engine = max(1, max_loras_per_engine)
        self.capacity_blocks = capacity_blocks
        self.pending_ttl = pending_ttl
        self.indexes = [PrefixIndex(capacity_blocks, pending_ttl) for _ in range(num_engines)]
        # Adapters each replica served last (an LRU as long as its host-memory cache).
        self.loras: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_engines)]
        self.sessions: OrderedDict[str, int] = OrderedDict()
        self.max_sessions = max_sessions
        self.alive = [True] * num_engines
        self._last_pick = [0] * num_engines  # a counter: ties go to the longest unpicked
        self._picks = 0
        self.stats = RouterStats()

    # ---- what the replicas report ---------------------------------------------------

    def record_kv_events(
        self, engine: int, stored: Sequence[BlockHash], removed: Sequence[BlockHash]
    ) -> None:
        if stored or removed:
            self.indexes[engine].apply_events(stored, removed)

    def add_engine(self) -> int:
        """Add a replica that joined (autoscaling) and return its index. Indexes are
        never reused: a session pinned to a replica that left moves on, not to a newcomer."""
        self.indexes.append(PrefixIndex(self.capacity_blocks, self.pending_ttl))
        self.loras.append(OrderedDict())
        self.alive.append(True)
        self._last_pick.append(0)
        self.num_engines += 1
        return self.num_engines - 1

    def mark_dead(self, engine: int) -> None:
        """Take a replica out of rotation (its sessions move on their next request)."""
        self.alive[engine] = False
        self.indexes[engine].clear()
        self.loras[engine].clear()

    # ---- the choice -----------------------------------------------------------------

    def route(
        self,
        prompt_token_ids: Sequence[int],
        loads: Sequence[int],
        *,
        cache_key: object = None,
        lora_id: int = 0,
        session: str | None = None,
        now: float | None = None,
    ) -> RouteDecision:
        """Pick a live replica for a prompt; ``loads``: each replica's tokens in flight.
        Raises RuntimeError when no replica is alive."""
        live = [i for i in range(self.num_engines) if self.alive[i]]
        if not live:
            raise RuntimeError("no engine replica is alive")
        now = time.monotonic() if now is None else now
        hashes = prompt_block_hashes(prompt_token_ids, self.block_size, cache_key)
        matched = {i: self.indexes[i].match(hashes, now) for i in live}
        decision = None
        if session is not None:
            pinned = self.sessions.get(session)
            if pinned is not None and self.alive[pinned]:
                self.sessions.move_to_end(session)
                decision = RouteDecision(pinned, "session")
        if decision is None and len(live) == 1:
            decision = RouteDecision(live[0], "only")
        if decision is None:
            n = len(prompt_token_ids)

            def cost(i: int) -> tuple[int, int]:
                c = loads[i] + n - matched[i] * self.block_size
                if lora_id and lora_id not in self.loras[i]:
                    c += self.lora_miss_cost
                return c, self._last_pick[i]

            best = min(live, key=cost)
            by_load = min(live, key=lambda i: (loads[i], self._last_pick[i]))
            if matched[best] and best != by_load:
                reason = "prefix"
            elif lora_id and lora_id in self.loras[best] and best != by_load:
                reason = "lora"
            else:
                reason = "load"
            decision = RouteDecision(best, reason)
        chosen = decision.engine
        decision.cached_tokens = matched[chosen] * self.block_size
        self._commit(chosen, hashes, lora_id, session, now)
        self.stats.decisions[decision.reason] = self.stats.decisions.get(decision.reason, 0) + 1
        self.stats.routed_prompt_tokens += len(prompt_token_ids)
        self.stats.expected_cached_tokens += decision.cached_tokens
        return decision

    def _commit(
        self, engine: int, hashes: list[BlockHash], lora_id: int, session: str | None, now: float
    ) -> None:
        self._picks += 1
        self._last_pick[engine] = self._picks
        self.indexes[engine].add_pending(hashes, now)
        if lora_id:
            loras = self.loras[engine]
            loras[lora_id] = None
            loras.move_to_end(lora_id)
            while len(loras) > self.max_loras_per_engine:
                loras.popitem(last=False)
        if session is not None:
            self.sessions[session] = engine
            self.sessions.move_to_end(session)
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)


def router_for(config: EngineConfig) -> Router | None:
    """The router for an engine's replicas (None with one replica: nothing to choose)."""
    num = config.parallel.data_parallel_size
    if num == 1:
        return None
    lora = config.lora
    return Router(
        num, config.cache.block_size, max_loras_per_engine=lora.max_cpu_loras if lora else 1
    )
