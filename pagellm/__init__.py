"""pagellm: paged-KV, continuously batched LLM inference and serving in Python."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["LLM", "LoRARequest", "PoolingParams", "RequestOutput", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from pagellm.entrypoints.llm import LLM
    from pagellm.lora.request import LoRARequest
    from pagellm.outputs import RequestOutput
    from pagellm.sampling_params import PoolingParams, SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy: `import pagellm` stays cheap (no torch) for the CLI's --help and the bench client.
    if name == "LLM":
        from pagellm.entrypoints.llm import LLM

        return LLM
    if name == "LoRARequest":
        from pagellm.lora.request import LoRARequest

        return LoRARequest
    if name == "SamplingParams":
        from pagellm.sampling_params import SamplingParams

        return SamplingParams
    if name == "PoolingParams":
        from pagellm.sampling_params import PoolingParams

        return PoolingParams
    if name == "RequestOutput":
        from pagellm.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(f"module 'pagellm' has no attribute {name!r}")
