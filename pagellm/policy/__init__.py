"""Serving policy: guardrails, per-key limits, dead-loop stops, the response cache (exact
and semantic) and model routing, configured by one policy file (docs/policy.md) and
applied as a step around the engine client."""

from __future__ import annotations

from typing import Any


async def final_output(stream: Any) -> Any:
    """The last output of an engine stream (a request the policy runs for itself: an
    embedding, a classifier verdict, a cascade draft); None if it gave none."""
    last = None
    async for out in stream:
        last = out
    return last
