"""Linear layers whose weights may be merged from several checkpoint tensors.

``Linear`` holds ``weight[out, in]`` (and an optional bias). A merged layer (QKV, or
gate+up) is one Linear whose output rows are split into named shards; the checkpoint's
separate tensors are copied into their row ranges by ``load_shard``:

    qkv_proj.weight rows:  [ q: Hq*D | k: Hkv*D | v: Hkv*D ]
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.layers import ops


class Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int | list[int],
        bias: bool = False,
        shard_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        sizes = out_features if isinstance(out_features, list) else [out_features]
        self.in_features = in_features
        self.out_features = sum(sizes)
        names = shard_names or [str(i) for i in range(len(sizes))]
        assert len(names) == len(sizes)
        self.shards: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in zip(names, sizes):
            self.shards[name] = (offset, size)
            offset += size
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        )
        self._lib = ops.current_native_lib()

    def load_shard(self, param_name: str, tensor: torch.Tensor, shard: str | None = None) -> None:
        param = self.weight if param_name == "weight" else self.bias
        if param is None:
            raise ValueError(f"checkpoint has a bias for a layer built without one ({param_name})")
        if shard is None:
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"shape mismatch: checkpoint {tuple(tensor.shape)} vs {tuple(param.shape)}"
                )
            param.data.copy_(tensor)
            return
        start, size = self.shards[shard]
        if tensor.shape[0] != size:
            raise ValueError(
                f"shard {shard}: checkpoint has {tensor.shape[0]} rows, expected {size}"
            )
        param.data[start : start + size].copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, self._lib)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class VocabEmbedding(nn.Module):
    """Token embedding; also the output projection when embeddings are tied."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self._lib = ops.current_native_lib()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.weight)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden @ weight^T: logits over the vocabulary."""
        return ops.linear(hidden, self.weight, None, self._lib)
