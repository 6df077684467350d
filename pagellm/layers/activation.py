"""Gated activations."""

from __future__ import annotations

import torch
from torch import nn

from pagellm.layers import ops


class SiluAndMul(nn.Module):
    """silu(gate) * up for the merged [gate | up] projection output."""

    def __init__(self) -> None:
        super().__init__()
        self._lib = ops.current_native_lib()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x, self._lib)
