"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.layers import ops


class SiluAndMul(nn.Module):
    """silu(gate) * up for the merged [gate | up] projection output."""

    def __init__(self) -> None:
        super().__init__()
        self._lib = ops.current_native_lib()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x, self._lib)


class GeluTanhAndMul(nn.Module):
    """gelu_tanh(gate) * up (Gemma's gelu_pytorch_tanh); torch ops."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


# Activation names of transformers configs -> the gated activation computing them.
GATED_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": SiluAndMul,
    "swish": SiluAndMul,
    "gelu_pytorch_tanh": GeluTanhAndMul,
    "gelu_tanh": GeluTanhAndMul,
}
