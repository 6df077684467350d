"""Architecture name (config.json "architectures") -> model class."""

from __future__ import annotations

import importlib

from torch import nn

# name -> (module under pagellm.models, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def check_architecture(name: str) -> None:
    if name not in _MODELS:
        raise ValueError(
            f"model architecture {name!r} is not supported; supported: "
            + ", ".join(supported_architectures())
        )


def get_model_class(name: str) -> type[nn.Module]:
    check_architecture(name)
    module, cls = _MODELS[name]
    return getattr(importlib.import_module(f"pagellm.models.{module}"), cls)
