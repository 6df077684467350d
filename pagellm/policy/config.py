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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

ACTIONS = ("block", "redact", "flag")
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
class ResponseCacheConfig:
    ttl_seconds: int = 600
    max_entries: int = 1024


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

    top = mapping(doc, "the policy", ("guardrails", "repetition", "keys", "response_cache"))
    rules: list[Rule] = []
    hold_back = 64
    if "guardrails" in top:
        g = mapping(top["guardrails"], "guardrails", ("hold_back_chars", "rules", "pii"))
        hold_back = integer(g, "hold_back_chars", 64, low=0) or 0
        raw_rules = g.get("rules") or _Seq()
        if not isinstance(raw_rules, list):
            raise fail(g, "guardrails.rules must be a list")
        for i, r in enumerate(raw_rules):
            r = mapping(r, f"guardrails.rules[{i}]",
                        ("name", "words", "regex", "action", "stage", "replacement"))  # fmt: skip
            name = r.get("name") or f"rule-{i}"
            words, regex = strings(r, "words"), r.get("regex")
            if (words is None) == (regex is None):
                raise fail(r, f"rule {name!r}: give exactly one of words or regex")
            if words is not None:
                source = r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b"
            else:
                if not isinstance(regex, str) or not regex:
                    raise fail(r, f"rule {name!r}: regex must be a non-empty string", "regex")
                source = regex
            try:
                pattern = re.compile(source, re.IGNORECASE)
            except re.error as e:
                raise fail(r, f"rule {name!r}: bad regex: {e}", "regex") from None
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
                    ("ttl_seconds", "max_entries"))  # fmt: skip
        cache = ResponseCacheConfig(
            integer(c, "ttl_seconds", 600) or 600, integer(c, "max_entries", 1024) or 1024
        )
    return PolicyConfig(path, tuple(rules), hold_back, repetition, keys, cache)
