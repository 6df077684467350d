"""Per-key limits: requests and tokens per minute (sliding 60 s windows), concurrent
requests, and the usage each key has had. A refusal is an OpenAI-style 429 with
Retry-After and the ``x-ratelimit-*`` headers OpenAI sends."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from pagellm.entrypoints.openai.serving_base import APIError
from pagellm.policy.config import KeyLimits

WINDOW = 60.0


def _reset(seconds: float) -> str:
    """OpenAI's reset format: 1s, 6m0s, 20ms."""
    if seconds < 1:
        return f"{max(1, int(seconds * 1000))}ms"
    s = math.ceil(seconds)
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


@dataclass
class KeyState:
    limits: KeyLimits
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[list[float]] = field(default_factory=deque)  # [time, tokens]
    inflight: int = 0
    usage: dict[str, int] = field(
        default_factory=lambda: {"requests": 0, "rejected": 0, "prompt_tokens": 0,
                                 "completion_tokens": 0}
    )  # fmt: skip

    def _trim(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW:
            self.tokens.popleft()

    def headers(self, now: float) -> dict[str, str]:
        lim, h = self.limits, {}
        if lim.requests_per_minute:
            h["x-ratelimit-limit-requests"] = str(lim.requests_per_minute)
            h["x-ratelimit-remaining-requests"] = str(
                max(0, lim.requests_per_minute - len(self.requests))
            )
            wait = self.requests[0] + WINDOW - now if self.requests else 0.0
            h["x-ratelimit-reset-requests"] = _reset(wait)
        if lim.tokens_per_minute:
            used = int(sum(n for _, n in self.tokens))
            h["x-ratelimit-limit-tokens"] = str(lim.tokens_per_minute)
            h["x-ratelimit-remaining-tokens"] = str(max(0, lim.tokens_per_minute - used))
            wait = self.tokens[0][0] + WINDOW - now if self.tokens else 0.0
            h["x-ratelimit-reset-tokens"] = _reset(wait)
        return h

    def admit(self, est_tokens: int) -> tuple[list[float] | None, dict[str, str]]:
        """Count one request estimated at ``est_tokens`` (prompt + max_tokens) or raise
        429. Returns the token entry to settle at the end, and the headers to send."""
        now = time.monotonic()
        self._trim(now)
        lim = self.limits

        def refuse(message: str, wait: float) -> APIError:
            self.usage["rejected"] += 1
            headers = self.headers(now)
            headers["retry-after"] = str(max(1, math.ceil(wait)))
            return APIError(429, message, "rate_limit_exceeded", None, "rate_limit_exceeded",
                            headers)  # fmt: skip

        if lim.max_concurrent is not None and self.inflight >= lim.max_concurrent:
            raise refuse(
                f"Too many concurrent requests for key {lim.name!r}: the limit is "
                f"{lim.max_concurrent}. Retry when one finishes.", 1.0,
            )  # fmt: skip
        if lim.requests_per_minute is not None and len(self.requests) >= lim.requests_per_minute:
            wait = self.requests[0] + WINDOW - now
            raise refuse(
                f"Rate limit reached for key {lim.name!r} on requests per minute: limit "
                f"{lim.requests_per_minute}. Please try again in {wait:.1f}s.", wait,
            )  # fmt: skip
        entry = None
        if lim.tokens_per_minute is not None:
            if est_tokens > lim.tokens_per_minute:
                raise refuse(
                    f"Request too large for key {lim.name!r}: {est_tokens} tokens (prompt + "
                    f"max_tokens) against a limit of {lim.tokens_per_minute} per minute; "
                    "lower max_tokens or shorten the prompt.", WINDOW,
                )  # fmt: skip
            used = sum(n for _, n in self.tokens)
            if used + est_tokens > lim.tokens_per_minute:
                # Wait until enough of the window's tokens have left it.
                need, wait = used + est_tokens - lim.tokens_per_minute, 0.0
                for t, n in self.tokens:
                    need -= n
                    wait = t + WINDOW - now
                    if need <= 0:
                        break
                raise refuse(
                    f"Rate limit reached for key {lim.name!r} on tokens per minute: limit "
                    f"{lim.tokens_per_minute}, used {int(used)}, requested {est_tokens}. "
                    f"Please try again in {wait:.1f}s.", wait,
                )  # fmt: skip
            entry = [now, float(est_tokens)]
            self.tokens.append(entry)
        self.requests.append(now)
        self.inflight += 1
        self.usage["requests"] += 1
        return entry, self.headers(now)

    def settle(self, entry: list[float] | None, prompt: int, completion: int) -> None:
        """A request ended: free its slot and count the tokens it really used."""
        self.inflight -= 1
        self.usage["prompt_tokens"] += prompt
        self.usage["completion_tokens"] += completion
        if entry is not None:
            entry[1] = float(prompt + completion)
