"""Quantization methods: a registry keyed by name, and the seam in ``Linear``.

Every ``Linear`` (and ``VocabEmbedding``) holds a ``LinearMethod`` chosen when the
model is built, from the ``QuantConfig`` the loader sets with ``use_quant_config``: the
method creates and loads the layer's weights and applies the layer to ``x``. A model
file never changes per method; LoRA and tensor parallelism are meant to wrap the same
seam.

    none   weights in the run dtype (GGUF blocks and AWQ/GPTQ codes dequantized): the
           reference mode of the parity tests
    gguf   GGUF blocks kept as stored (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)
    int8   per-channel symmetric int8, quantized at load from float weights
    int4   group-wise (32 or 128) asymmetric int4, quantized at load
    awq    AutoAWQ GEMM checkpoints      \\  4-bit codes, zeros and scales mapped onto
    gptq   AutoGPTQ/GPTQModel checkpoints /  the int4 kernels (act-order included)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

from pagellm.config import QuantConfig

if TYPE_CHECKING:
    from pagellm.layers.quantization.base import LinearMethod

QUANTIZATION_CHOICES = ("auto", "none", "gguf", "int8", "int4", "awq", "gptq")


def method_for(config: QuantConfig, role: str = "linear") -> LinearMethod:
    """The method for a layer of ``role`` (linear, lm_head, embedding or router)."""
    from pagellm.layers.quantization import base

    name = config.method
    if role == "router":
        # A mixture-of-experts router is tiny and decides which experts run: float.
        name = "none"
    elif role == "linear" and config.checkpoint_method is not None:
        name = config.checkpoint_method  # reads the packed codes (and dequantizes for none)
    elif role != "linear":
        # Embedding tables and the LM head: int4 is too coarse for them (the int8 path
        # serves them); AWQ/GPTQ checkpoints keep them in floating point.
        name = {"int4": "int8", "awq": "none", "gptq": "none"}.get(name, name)
    return base.get_method_class(name)(config)


_QUANT: ContextVar[QuantConfig | None] = ContextVar("pagellm_quant_config", default=None)


@contextmanager
def use_quant_config(config: QuantConfig) -> Iterator[None]:
    """Layers built inside this block quantize their weights as ``config`` says."""
    token = _QUANT.set(config)
    try:
        yield
    finally:
        _QUANT.reset(token)


def current_quant_config() -> QuantConfig:
    return _QUANT.get() or QuantConfig()
