"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

import torch
from torch import nn

from pagellm.layers import ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eps = eps
        self._lib = ops.current_native_lib()

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (norm(x + residual), x + residual); with no residual, x is the residual.

        The native kernel updates ``residual`` in place; callers own it.
        """
        return ops.rms_norm(x, self.weight, self.eps, residual, self._lib)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """Plain RMSNorm over the last dimension (any leading shape)."""
        shape = x.shape
        out, _ = ops.rms_norm(
            x.reshape(-1, shape[-1]).contiguous(), self.weight, self.eps, None, self._lib
        )
        return out.view(shape)
