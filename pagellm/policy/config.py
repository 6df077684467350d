"""The policy file (``--policy policy.yaml``): its schema, read with line numbers so that a
mistake is reported where it is (docs/policy.md has the full schema).

    guardrails:
      hold_back_chars: 64          # streamed text kept back until no rule can still match
      rules:
        - name: no-passwords       # named in errors, verdicts and metrics
          words: [password, passwd]   # whole words, any case (or `regex: "..."`)
          action: block            # block | redact | flag
          stage: both              # input | output | both
          replacement: "[REDACTED]"
      pii:
        types: [email, phone, card, ip]   # card: 13-19 digits passing the Luhn check
        action: redact
        stage: both
    repetition:                    # dead loops: off unless this section is there
      max_period: 16               # token cycles of 1..16 tokens
      min_repeats: 8               # stopped once the cycle has repeated this many times
      finish_reason: repetition
    keys:                          # when present, only these keys (and --api-key) pass
      - key: sk-alice
        name: alice                # the label in /metrics (never the key itself)
        requests_per_minute: 60
        tokens_per_minute: 20000   # prompt + max_tokens at admission, settled at the end
        max_concurrent: 4
        max_tokens: 512            # requests asking more are capped
        models: [SmolLM2-135M-Instruct]   # served names and adapters; absent: all
    response_cache:                # temperature-0 replies answered again from memory
      ttl_seconds: 600
      max_entries: 1024
      semantic:                    # paraphrases too: the prompt's embedding, cosine
        embedding: {model: SmolLM2-135M-Instruct}   # or {url: http://h:8001/v1, model: m}
        threshold: 0.97
    routes:                        # served names that pick a model per request
      - name: auto
        small: SmolLM2-135M-Instruct
        large: my-large-adapter
        by: cascade                # length | match | cascade
    guardrails.prompt_leak / guardrails.classifier: see docs/policy.md
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

ACTIONS = ("block", "redact", "flag")
ROUTE_BY = ("length", "match", "cascade")
INDEXES = ("auto", "numpy", "faiss")
# PromptEOL (Jiang et al. 2023): a causal LM's last hidden state after this prompt is a
# far better sentence embedding than the text alone (docs/policy.md has the numbers).
DEFAULT_EMBED_TEMPLATE = 'This sentence : "{text}" means in one word:"'
DEFAULT_GUARD_TEMPLATE = (
    "You are a safety classifier. Is the following text safe or unsafe? Answer with one "
    "word, safe or unsafe.\n\nText: {text}"
)
STAGES = ("input", "output", "both")
PII_TYPES = ("email", "phone", "card", "ip")


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and line."""


class _Map(dict):  # type: ignore[type-arg]
    line = 0
    key_lines: dict[Any, int] = {}  # noqa: RUF012 (set per instance by the loader)


class _Seq(list):  # type: ignore[type-arg]
    line = 0


class _LineLoader(yaml.SafeLoader):
    """Keeps the line of every mapping and sequence (1-based)."""


def _map(loader: _LineLoader, node: yaml.MappingNode) -> _Map:
    m = _Map(loader.construct_mapping(node, deep=True))
    m.line = node.start_mark.line + 1
    m.key_lines = {getattr(k, "value", None): k.start_mark.line + 1 for k, _ in node.value}
    return m


def _seq(loader: _LineLoader, node: yaml.SequenceNode) -> _Seq:
    s = _Seq(loader.construct_sequence(node, deep=True))
    s.line = node.start_mark.line + 1
    return s


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _map)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _seq)


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern[str]
    action: str
    stage: str
    replacement: str


@dataclass(frozen=True)
class RepetitionConfig:
    max_period: int = 16
    min_repeats: int = 8
    finish_reason: str = "repetition"


@dataclass(frozen=True)
class EmbeddingSource:
    """Where prompt embeddings come from: a name this server serves (``url`` None) or
    another pagellm's (or any OpenAI-compatible) ``/v1/embeddings``."""

    model: str | None = None
    url: str | None = None
    api_key: str | None = None
    template: str = DEFAULT_EMBED_TEMPLATE


@dataclass(frozen=True)
class SemanticConfig:
    embedding: EmbeddingSource
    threshold: float = 0.97
    thresholds: dict[str, float] = field(default_factory=dict)  # per served name
    index: str = "auto"

    def threshold_for(self, model: str) -> float:
        return self.thresholds.get(model, self.threshold)


@dataclass(frozen=True)
class ResponseCacheConfig:
    ttl_seconds: int = 600
    max_entries: int = 1024
    semantic: SemanticConfig | None = None


@dataclass(frozen=True)
class RouteConfig:
    """A served name that sends each request to ``small`` or ``large`` (names this
    server serves: the base model or LoRA adapters)."""

    name: str
    small: str
    large: str
    by: str
    max_prompt_tokens: int = 512  # by length: longer prompts go to large
    pattern: re.Pattern[str] | None = None  # by match: a prompt that matches goes to large
    draft_tokens: int = 16  # by cascade: small drafts this many tokens, greedy
    min_mean_logprob: float = -1.0  # ... and answers if their mean logprob is at least this


@dataclass(frozen=True)
class LeakConfig:
    min_chars: int = 40  # a run of the system prompt this long in the output is a leak
    action: str = "block"


@dataclass(frozen=True)
class ClassifierConfig:
    model: str
    stage: str = "both"
    template: str = DEFAULT_GUARD_TEMPLATE
    unsafe: re.Pattern[str] = re.compile(r"^\W*unsafe", re.IGNORECASE)
    max_tokens: int = 4
    action: str = "block"  # block | flag


@dataclass(frozen=True)
class KeyLimits:
    key: str
    name: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    max_tokens: int | None = None
    models: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PolicyConfig:
    path: str = ""
    rules: tuple[Rule, ...] = ()
    hold_back_chars: int = 64
    repetition: RepetitionConfig | None = None
    keys: dict[str, KeyLimits] = field(default_factory=dict)
    response_cache: ResponseCacheConfig | None = None
    routes: dict[str, RouteConfig] = field(default_factory=dict)
    prompt_leak: LeakConfig | None = None
    classifier: ClassifierConfig | None = None

    def rules_for(self, stage: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.stage in (stage, "both"))


# The PII patterns; a match is a candidate (cards are checked with Luhn after).
PII_PATTERNS = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "card": r"(?<![\d])(?:\d[ -]?){12,18}\d(?![\d])",
    "phone": r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?!\d)",
    "ip": r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\d.])",
}


def luhn_ok(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def load_policy(path: str) -> PolicyConfig:
    """Read and check a policy file (PolicyError naming the line on any mistake)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise PolicyError(f"cannot read the policy file {path}: {e.strerror}") from None
    try:
        doc = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    return parse_policy(doc if doc is not None else _Map(), path)


def parse_policy(doc: Any, path: str = "<policy>") -> PolicyConfig:
    def fail(node: Any, message: str, key: str | None = None) -> PolicyError:
        line = getattr(node, "key_lines", {}).get(key) or getattr(node, "line", 1)
        return PolicyError(f"{path} line {line}: {message}")

    def mapping(node: Any, where: str, allowed: tuple[str, ...]) -> _Map:
        if not isinstance(node, dict):
            raise fail(node, f"{where} must be a mapping")
        unknown = [k for k in node if k not in allowed]
        if unknown:
            raise fail(
                node, f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})",
                unknown[0],
            )  # fmt: skip
        return node  # type: ignore[return-value]

    def integer(node: Any, key: str, default: int | None, low: int = 1) -> int | None:
        value = node.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise fail(node, f"{key} must be an integer >= {low}, got {value!r}", key)
        return value

    def choice(node: Any, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = node.get(key, default)
        if value not in allowed:
            raise fail(node, f"{key} must be one of {', '.join(allowed)}, got {value!r}", key)
        return str(value)

    def strings(node: Any, key: str) -> list[str] | None:
        value = node.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise fail(node, f"{key} must be a list of non-empty strings", key)
        return list(value)

    def number(node: Any, key: str, default: float, low: float, high: float) -> float:
        value = node.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (low <= value <= high)
        ):
            raise fail(node, f"{key} must be a number in [{low}, {high}], got {value!r}", key)
        return float(value)

    def text(node: Any, key: str, default: str | None = None) -> str | None:
        value = node.get(key, default)
        if value is not None and (not isinstance(value, str) or not value):
            raise fail(node, f"{key} must be a non-empty string", key)
        return value

    def template(node: Any, key: str, default: str) -> str:
        value = text(node, key, default) or default
        if "{text}" not in value:
            raise fail(node, f"{key} must contain {{text}}", key)
        return value

    def pattern_of(node: Any, what: str, required: bool) -> re.Pattern[str] | None:
        """A words: list (whole words, any case) or a regex: string; one of them."""
        words, regex = strings(node, "words"), node.get("regex")
        if words is None and regex is None and not required:
            return None
        if (words is None) == (regex is None):
            raise fail(node, f"{what}: give exactly one of words or regex")
        if words is not None:
            source = r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b"
        else:
            if not isinstance(regex, str) or not regex:
                raise fail(node, f"{what}: regex must be a non-empty string", "regex")
            source = regex
        try:
            return re.compile(source, re.IGNORECASE)
        except re.error as e:
            raise fail(node, f"{what}: bad regex: {e}", "regex") from None

    top = mapping(doc, "the policy",
                  ("guardrails", "repetition", "keys", "response_cache", "routes"))  # fmt: skip
    rules: list[Rule] = []
    hold_back = 64
    if "guardrails" in top:
        g = mapping(top["guardrails"], "guardrails",
                    ("hold_back_chars", "rules", "pii", "prompt_leak", "classifier"))  # fmt: skip
        hold_back = integer(g, "hold_back_chars", 64, low=0) or 0
        raw_rules = g.get("rules") or _Seq()
        if not isinstance(raw_rules, list):
            raise fail(g, "guardrails.rules must be a list")
        for i, r in enumerate(raw_rules):
            r = mapping(r, f"guardrails.rules[{i}]",
                        ("name", "words", "regex", "action", "stage", "replacement"))  # fmt: skip
            name = r.get("name") or f"rule-{i}"
            pattern = pattern_of(r, f"rule {name!r}", True)
            assert pattern is not None
            rules.append(Rule(
                str(name), pattern, choice(r, "action", "block", ACTIONS),
                choice(r, "stage", "both", STAGES), str(r.get("replacement", "[REDACTED]")),
            ))  # fmt: skip
        if "pii" in g:
            p = mapping(g["pii"], "guardrails.pii", ("types", "action", "stage"))
            types = strings(p, "types") or list(PII_TYPES)
            bad = [t for t in types if t not in PII_TYPES]
            if bad:
                raise fail(p, f"pii type {bad[0]!r} is not one of {', '.join(PII_TYPES)}", "types")
            action = choice(p, "action", "redact", ACTIONS)
            stage = choice(p, "stage", "both", STAGES)
            for t in types:
                rules.append(Rule(
                    f"pii:{t}", re.compile(PII_PATTERNS[t]), action, stage, f"[{t.upper()}]"
                ))  # fmt: skip
    leak = classifier = None
    if "guardrails" in top and "prompt_leak" in top["guardrails"]:
        lk = mapping(top["guardrails"]["prompt_leak"] or _Map(), "guardrails.prompt_leak",
                     ("min_chars", "action"))  # fmt: skip
        leak = LeakConfig(integer(lk, "min_chars", 40, low=8) or 40,
                          choice(lk, "action", "block", ACTIONS))  # fmt: skip
    if "guardrails" in top and "classifier" in top["guardrails"]:
        c = mapping(top["guardrails"]["classifier"], "guardrails.classifier",
                    ("model", "stage", "template", "unsafe_regex", "max_tokens", "action"))  # fmt: skip
        model = text(c, "model")
        if model is None:
            raise fail(c, "guardrails.classifier needs a model (a name this server serves)")
        try:
            unsafe = re.compile(text(c, "unsafe_regex", r"^\W*unsafe") or "", re.IGNORECASE)
        except re.error as e:
            raise fail(c, f"unsafe_regex: bad regex: {e}", "unsafe_regex") from None
        classifier = ClassifierConfig(
            model, choice(c, "stage", "both", STAGES),
            template(c, "template", DEFAULT_GUARD_TEMPLATE), unsafe,
            integer(c, "max_tokens", 4) or 4, choice(c, "action", "block", ("block", "flag")),
        )  # fmt: skip
    repetition = None
    if "repetition" in top:
        r = mapping(top["repetition"], "repetition", ("max_period", "min_repeats", "finish_reason"))
        repetition = RepetitionConfig(
            integer(r, "max_period", 16) or 16, integer(r, "min_repeats", 8, low=2) or 8,
            str(r.get("finish_reason", "repetition")),
        )  # fmt: skip
    keys: dict[str, KeyLimits] = {}
    if "keys" in top:
        raw_keys = top["keys"]
        if not isinstance(raw_keys, list):
            raise fail(top, "keys must be a list")
        for i, k in enumerate(raw_keys):
            k = mapping(k, f"keys[{i}]", (
                "key", "name", "requests_per_minute", "tokens_per_minute", "max_concurrent",
                "max_tokens", "models",
            ))  # fmt: skip
            key = k.get("key")
            if not isinstance(key, str) or not key:
                raise fail(k, f"keys[{i}] needs a key (the bearer token)")
            if key in keys:
                raise fail(k, f"keys[{i}]: the same key appears twice")
            models = strings(k, "models")
            keys[key] = KeyLimits(
                key, str(k.get("name") or f"key-{i}"),
                integer(k, "requests_per_minute", None), integer(k, "tokens_per_minute", None),
                integer(k, "max_concurrent", None), integer(k, "max_tokens", None),
                None if models is None else tuple(models),
            )  # fmt: skip
    cache = None
    if "response_cache" in top:
        c = mapping(top["response_cache"] or _Map(), "response_cache",
                    ("ttl_seconds", "max_entries", "semantic"))  # fmt: skip
        semantic = None
        if "semantic" in c:
            sm = mapping(c["semantic"], "response_cache.semantic",
                         ("embedding", "threshold", "thresholds", "index"))  # fmt: skip
            if "embedding" not in sm:
                raise fail(sm, "response_cache.semantic needs an embedding ({model: a name "
                           "served here} or {url: ..., model: ...})")  # fmt: skip
            em = mapping(sm.get("embedding"), "response_cache.semantic.embedding",
                        ("model", "url", "api_key", "template"))  # fmt: skip
            url = text(em, "url")
            if url is None and text(em, "model") is None:
                raise fail(em, "embedding needs a model (served here) or a url and model")
            if url is not None and not url.startswith(("http://", "https://")):
                raise fail(em, f"url must start with http:// or https://, got {url!r}", "url")
            thresholds = sm.get("thresholds") or {}
            if not isinstance(thresholds, dict):
                raise fail(sm, "thresholds must map served names to numbers", "thresholds")
            for name in thresholds:
                number(thresholds, name, 0.0, -1.0, 1.0)
            semantic = SemanticConfig(
                EmbeddingSource(text(em, "model"), url, text(em, "api_key"),
                                template(em, "template", DEFAULT_EMBED_TEMPLATE)),
                number(sm, "threshold", 0.97, -1.0, 1.0),
                {str(k): float(v) for k, v in thresholds.items()},
                choice(sm, "index", "auto", INDEXES),
            )  # fmt: skip
        cache = ResponseCacheConfig(
            integer(c, "ttl_seconds", 600) or 600, integer(c, "max_entries", 1024) or 1024,
            semantic,
        )  # fmt: skip
    routes: dict[str, RouteConfig] = {}
    if "routes" in top:
        raw_routes = top["routes"]
        if not isinstance(raw_routes, list):
            raise fail(top, "routes must be a list", "routes")
        for i, r in enumerate(raw_routes):
            r = mapping(r, f"routes[{i}]", (
                "name", "small", "large", "by", "max_prompt_tokens", "words", "regex",
                "draft_tokens", "min_mean_logprob",
            ))  # fmt: skip
            name, small, large = text(r, "name"), text(r, "small"), text(r, "large")
            if name is None or small is None or large is None:
                raise fail(r, f"routes[{i}] needs a name, a small and a large model")
            if name in routes:
                raise fail(r, f"routes[{i}]: the route {name!r} appears twice", "name")
            if name in (small, large):
                raise fail(r, f"route {name!r} cannot route to itself", "name")
            by = choice(r, "by", "length", ROUTE_BY)
            routes[name] = RouteConfig(
                name, small, large, by, integer(r, "max_prompt_tokens", 512) or 512,
                pattern_of(r, f"route {name!r}", by == "match"),
                integer(r, "draft_tokens", 16) or 16,
                number(r, "min_mean_logprob", -1.0, -100.0, 0.0),
            )  # fmt: skip
    return PolicyConfig(
        path, tuple(rules), hold_back, repetition, keys, cache, routes, leak, classifier
    )
