"""Architecture name (config.json "architectures") -> model class."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

# name -> (module under pagellm.models, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("moe", "Qwen3MoeForCausalLM"),
    "MixtralForCausalLM": ("moe", "MixtralForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def check_architecture(name: str) -> None:
    if name not in _MODELS:
        raise ValueError(
            f"model architecture {name!r} is not supported; supported: "
            + ", ".join(supported_architectures())
        )


def attention_windows(cfg: Any, name: str) -> list[int | None]:
    """Each attention layer's sliding window (None: full) for a config of this arch."""
    if name == "Gemma3ForCausalLM":
        from pagellm.models.gemma3 import gemma3_layer_types

        window = getattr(cfg, "sliding_window", None)
        return [
            int(window) if window and t == "sliding_attention" else None
            for t in gemma3_layer_types(cfg)
        ]
    from pagellm.models.llama import sliding_windows

    return sliding_windows(cfg)


def get_model_class(name: str) -> type[nn.Module]:
    check_architecture(name)
    module, cls = _MODELS[name]
    return getattr(importlib.import_module(f"pagellm.models.{module}"), cls)
