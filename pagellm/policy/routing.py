"""Small/large model routing: a served name (a *route*) whose requests go to one of two
names this server serves (the base model or LoRA adapters), chosen per request by

- ``length``: prompts of at most ``max_prompt_tokens`` tokens go to small, longer to large;
- ``match``: prompts that match ``words``/``regex`` (a class of hard requests) go to
  large, the rest to small;
- ``cascade``: small drafts ``draft_tokens`` tokens greedily; if their mean token
  logprob reaches ``min_mean_logprob`` small is sure enough and answers, otherwise the
  request cascades to large. The draft is a separate short request (its prefill is then
  a prefix-cache hit for small's real run): it costs ``draft_tokens`` decode steps of the
  small model on every request, the price of knowing before the reply starts.

The choice is made at admission, before the response starts, so the response can say
which model answered (its ``model`` field and ``x-pagellm-route``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from pagellm.policy import final_output
from pagellm.policy.config import RouteConfig
from pagellm.sampling_params import RequestOutputKind

_ids = itertools.count()


@dataclass(frozen=True)
class RouteRequest:
    """What a route's name resolves to in the serving layer; the policy replaces it by
    the chosen model's adapter (or None for the base model) at admission."""

    route: str


@dataclass(frozen=True)
class Choice:
    side: str  # small | large
    model: str
    score: float | None = None  # cascade: the draft's mean token logprob


def mean_logprob(output: Any) -> float:
    """The mean logprob of the tokens a completion sampled (-inf if it has none)."""
    lps = output.logprobs or []
    vals = [entry[t].logprob for t, entry in zip(output.token_ids, lps) if t in entry]
    return sum(vals) / len(vals) if vals else float("-inf")


async def choose(route: RouteConfig, engine: Any, resolve: Any, prompt: Any,
                 prompt_ids: list[int], text: str | None, params: Any) -> Choice:  # fmt: skip
    """Which of the route's two models runs this request."""
    if route.by == "length":
        side = "small" if len(prompt_ids) <= route.max_prompt_tokens else "large"
        return Choice(side, getattr(route, side))
    if route.by == "match":
        hard = text is not None and route.pattern is not None and route.pattern.search(text)
        return Choice("large", route.large) if hard else Choice("small", route.small)
    draft = params.clone()
    draft.max_tokens, draft.temperature, draft.n, draft.best_of = route.draft_tokens, 0.0, 1, None
    draft.logprobs, draft.prompt_logprobs, draft.use_beam_search = 0, None, False
    draft.output_kind = RequestOutputKind.FINAL_ONLY
    _, lora = resolve(route.small)
    stream = engine.add_request(prompt, draft, f"route-draft-{next(_ids)}", lora_request=lora)
    out = await final_output(stream)
    score = mean_logprob(out.outputs[0]) if out is not None and out.outputs else float("-inf")
    if score >= route.min_mean_logprob:
        return Choice("small", route.small, score)
    return Choice("large", route.large, score)
