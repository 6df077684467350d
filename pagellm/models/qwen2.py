"""Qwen2: the Llama decoder with a bias on the q/k/v projections."""

from __future__ import annotations

from typing import Any

from pagellm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def arch_flags(cfg: Any) -> tuple[bool, bool, bool]:
        return True, False, False
