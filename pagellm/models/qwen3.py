"""Qwen3: the Llama decoder with RMSNorm on each query and key head (before RoPE)."""

from __future__ import annotations

from typing import Any

from pagellm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def arch_flags(cfg: Any) -> tuple[bool, bool, bool]:
        bias = bool(getattr(cfg, "attention_bias", False))
        return bias, bias, True
