"""Guardrails on text: one scan for every rule (blocklists, PII), used whole on a prompt
and incrementally on a stream, where text is held back until no rule can still match.

A streamed reply arrives in pieces that cut words, emails and card numbers anywhere. The
filter keeps the last ``hold_back_chars`` characters unsent: a match is only acted on
once it ends before that window (it cannot grow any more) or the reply has ended, and
nothing at or after the start of an undecided match is sent. So a redacted value never
leaves in fragments, as long as the window is longer than the longest match.

Prompt leaks: ``LeakPattern`` stands in a rule for a pattern and matches every run of at
least ``min_chars`` characters that the request's system prompt contains verbatim, so a
leak is held back, blocked or redacted like any other match.

Dead loops: ``RepetitionDetector`` sees the token ids and reports when the output's tail
is one cycle of 1..max_period tokens repeated min_repeats times.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagellm.policy.config import RepetitionConfig, Rule, luhn_ok


@dataclass
class Verdict:
    """What the rules did to a piece of text."""

    text: str
    blocked: Rule | None = None
    redacted: list[Rule] = field(default_factory=list)
    flagged: list[Rule] = field(default_factory=list)


def _matches(rules: tuple[Rule, ...], text: str) -> list[tuple[int, int, Rule]]:
    found = []
    for rule in rules:
        for m in rule.pattern.finditer(text):
            if m.end() == m.start():
                continue
            if rule.name == "pii:card" and not luhn_ok(m.group()):
                continue
            found.append((m.start(), m.end(), rule))
    found.sort(key=lambda x: (x[0], -x[1]))
    return found


class _Span:
    def __init__(self, text: str, start: int, end: int) -> None:
        self._text, self._start, self._end = text, start, end

    def start(self) -> int:
        return self._start

    def end(self) -> int:
        return self._end

    def group(self) -> str:
        return self._text[self._start : self._end]


class LeakPattern:
    """Runs of at least ``min_chars`` characters of ``secret`` inside a text (the
    longest run at each place); used as a rule's pattern."""

    def __init__(self, secret: str, min_chars: int) -> None:
        self.secret, self.n = secret, min_chars
        self.grams = {secret[i : i + min_chars] for i in range(len(secret) - min_chars + 1)}

    def finditer(self, text: str) -> list[_Span]:
        found, i, n = [], 0, self.n
        while i + n <= len(text):
            if text[i : i + n] not in self.grams:
                i += 1
                continue
            j = i + n
            while j < len(text) and text[i : j + 1] in self.secret:
                j += 1
            found.append(_Span(text, i, j))
            i = j
        return found


def leak_rule(system_prompt: str, min_chars: int, action: str) -> Rule:
    return Rule("prompt-leak", LeakPattern(system_prompt, min_chars), action, "output",  # type: ignore[arg-type]
                "[SYSTEM PROMPT]")  # fmt: skip


def apply_rules(rules: tuple[Rule, ...], text: str) -> Verdict:
    """The whole text judged at once (a prompt, or a finished reply)."""
    f = StreamFilter(rules, 0)
    v = f.feed(text, final=True)
    return v


class StreamFilter:
    """Judge a reply as it streams: ``feed`` takes the new text and returns what may be
    sent now (redacted), or the rule that blocked it (the text before the match is
    still sent)."""

    def __init__(self, rules: tuple[Rule, ...], hold_back_chars: int) -> None:
        self.rules = rules
        self.hold = hold_back_chars
        self.pending = ""
        self.done = False

    def feed(self, delta: str, final: bool = False) -> Verdict:
        if self.done:
            return Verdict("")
        text = self.pending + delta
        if not self.rules:
            self.pending = ""
            return Verdict(text)
        limit = len(text) if final else max(0, len(text) - self.hold)
        cut = limit
        decided: list[tuple[int, int, Rule]] = []
        end_of_last = 0
        for start, end, rule in _matches(self.rules, text):
            if start < end_of_last:
                continue  # overlaps a match already taken
            if end > limit:  # may still grow: hold everything from its start
                cut = min(cut, start)
                continue
            if start >= cut:
                continue
            decided.append((start, end, rule))
            end_of_last = end
        out: list[str] = []
        verdict = Verdict("")
        pos = 0
        for start, end, rule in decided:
            out.append(text[pos:start])
            if rule.action == "block":
                verdict.text, verdict.blocked = "".join(out), rule
                self.done, self.pending = True, ""
                return verdict
            if rule.action == "redact":
                out.append(rule.replacement)
                verdict.redacted.append(rule)
            else:
                out.append(text[start:end])
                verdict.flagged.append(rule)
            pos = end
        cut = max(cut, pos)
        out.append(text[pos:cut])
        self.pending = text[cut:]
        verdict.text = "".join(out)
        if final:
            self.done = True
        return verdict


class RepetitionDetector:
    """Whether the output's last tokens are one short cycle repeated past the limit."""

    def __init__(self, config: RepetitionConfig) -> None:
        self.config = config
        self.tokens: list[int] = []

    def add(self, token_ids: list[int]) -> bool:
        self.tokens.extend(token_ids)
        t = self.tokens
        reps = self.config.min_repeats
        for p in range(1, self.config.max_period + 1):
            span = p * reps
            if len(t) < span:
                break
            if t[-1] != t[-1 - p]:
                continue  # the cheap test rejects almost every period
            if t[-span:-p] == t[-span + p :]:
                return True
        return False
