"""Linear layers whose weights may be merged from several checkpoint tensors and stored
by any quantization method.

``Linear`` computes ``x @ weight^T (+ bias)`` for a weight of [out, in]. A merged layer
(QKV, or gate+up) is one Linear whose output rows are split into named shards; the
checkpoint's separate tensors fill their row ranges:

    qkv_proj rows:  [ q: Hq*D | k: Hkv*D | v: Hkv*D ]

How the weight is stored and multiplied belongs to the layer's ``LinearMethod`` (see
pagellm.layers.quantization), chosen when the layer is built from the quantization
config in effect; the bias is always kept in the run dtype here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagellm.layers import ops
from pagellm.layers.quantization import current_quant_config, method_for


class Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int | list[int],
        bias: bool = False,
        shard_names: list[str] | None = None,
        role: str = "linear",
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
        self.bias = (
            nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        )
        self._bias_loaded: set[str] = set()
        self._lib = ops.current_native_lib()
        probe = torch.empty(0)  # built under the model's device and dtype
        self._device, self._dtype = probe.device, probe.dtype
        # Written by the method: the weight (or its packed runs) and its load state.
        self.weight: Any = None
        self.staged: dict[str, dict[str, Any]]
        self.runs: list[Any]
        self.fast_apply: Any = None
        self.loaded_shards: set[str]
        # LoRA adapters installed on this layer (pagellm.lora.layers.LinearLoRA), if any.
        self.lora: Any = None
        self.method = method_for(current_quant_config(), role)
        self.method.create_weights(self)

    def bias_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where the layer lives and its run dtype."""
        return self._device, self._dtype

    def load_shard(self, param_name: str, tensor: Any, shard: str | None = None) -> None:
        """Take one checkpoint tensor; ``shard`` names its row range in a merged layer."""
        if shard is None:
            if len(self.shards) != 1:
                raise ValueError(f"{param_name}: a merged layer needs the shard name")
            shard = next(iter(self.shards))
        if param_name == "bias":
            if self.bias is None:
                raise ValueError("checkpoint has a bias for a layer built without one")
            from pagellm.layers.quantization.base import as_float_tensor

            value = as_float_tensor(tensor)
            start, size = self.shards[shard]
            if tuple(value.shape) != (size,):
                raise ValueError(
                    f"bias shard {shard}: checkpoint {tuple(value.shape)}, expected ({size},)"
                )
            self.bias.data[start : start + size].copy_(value)
            self._bias_loaded.add(shard)
            return
        self.method.load(self, param_name, tensor, shard)

    def missing(self) -> list[str]:
        """What the checkpoint has not filled, as 'param#shard' entries."""
        out = self.method.missing(self)
        if self.bias is not None:
            out += [f"bias#{s}" for s in self.shards if s not in self._bias_loaded]
        return out

    def finalize(self) -> None:
        """After loading: let the method repack the weights."""
        self.method.finalize(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x)
        if self.lora is not None:  # base output + this step's adapter deltas
            y = self.lora.apply(x, y)
        return y

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
            f"method={self.method.describe(self)}"
        )


class VocabEmbedding(Linear):
    """Token embedding; also the output projection (the LM head) when embeddings are tied."""

    def __init__(self, vocab_size: int, hidden_size: int, role: str = "embedding") -> None:
        super().__init__(hidden_size, vocab_size, role=role)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.method.embed(self, input_ids)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden @ weight^T: logits over the vocabulary."""
        return self.method.apply(self, hidden)
