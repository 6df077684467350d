"""Reasoning parsers (``--reasoning-parser``): split a reasoning model's thinking from its
answer, so that chat gives ``reasoning_content`` beside ``content`` (and the Responses API
a reasoning item), streamed separately.

    qwen3        Qwen3 and models like it: the reply may begin with ``<think>``; what lies
                 between it and ``</think>`` is reasoning, the rest is the answer. A reply
                 that does not begin with ``<think>`` is all answer.
    deepseek_r1  DeepSeek-R1: the chat template opens ``<think>`` in the prompt, so the
                 reply is reasoning up to ``</think>`` (a leading ``<think>`` is dropped)
                 and answer after it; a reply without ``</think>`` is all reasoning.

``split(text, final)`` is pure: the same text gives the same parts, and while streaming
(``final=False``) a tail that may still become a tag is held back, so that each part only
grows as text arrives and the streamed deltas concatenate to the final parts.
"""

from __future__ import annotations

from typing import ClassVar


def _partial_tail(text: str, tag: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class ReasoningParser:
    name: ClassVar[str]
    start: ClassVar[str] = "<think>"
    end: ClassVar[str] = "</think>"
    opens_in_prompt: ClassVar[bool] = False

    def split(self, text: str, final: bool = True) -> tuple[str, str]:
        """(reasoning, answer) of the text so far."""
        body = text.lstrip()
        if body.startswith(self.start):
            body = body[len(self.start) :]
        elif not final and self.start.startswith(body):
            return "", ""  # blank, or the first characters of <think>
        elif not self.opens_in_prompt:
            return "", text
        i = body.find(self.end)
        if i >= 0:
            return body[:i].lstrip(), body[i + len(self.end) :].lstrip()
        if final:
            return body.lstrip(), ""
        return body[: len(body) - _partial_tail(body, self.end)].lstrip(), ""


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    opens_in_prompt = True


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    cls.name: cls for cls in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser)
}


def get_reasoning_parser(name: str | None) -> ReasoningParser | None:
    if not name:
        return None
    if name not in REASONING_PARSERS:
        raise ValueError(
            f"unknown reasoning parser {name!r}; available: {', '.join(sorted(REASONING_PARSERS))}"
        )
    return REASONING_PARSERS[name]()
