"""Linear layers whose weights may be merged from several checkpoint tensors and stored
by any quantization method.

``Linear`` computes ``x @ weight^T (+ bias)`` for a weight of [out, in]. A merged layer
(QKV, or gate+up) is one Linear whose output rows are split into named shards; the
checkpoint's separate tensors fill their row ranges:

    qkv_proj rows:  [ q: Hq*D | k: Hkv*D | v: Hkv*D ]

How the weight is stored and multiplied belongs to the layer's ``LinearMethod`` (see
pagellm.layers.quantization), chosen when the layer is built from the quantization
config in effect; the bias is always kept in the run dtype here.

Tensor parallelism (``tp``) is a property of the layer, as in Megatron-LM:

    column   each rank holds some output rows of every shard (its heads, its MLP columns);
             the layer is built with the rank's sizes and ``row_offsets`` says where each
             shard's rows start in the checkpoint tensor
    row      each rank holds a slice of the input columns and its output is a partial sum,
             all-reduced over the stage's TP ranks (``reduce``); the bias is added once
    vocab    (VocabEmbedding) each rank holds a range of the vocabulary's rows

Checkpoint tensors arrive whole and each rank keeps only its part (the method's
``slice_tensor``: quantized blocks and AWQ/GPTQ words are cut along whole blocks), so a
rank's memory holds 1/tp of the sharded weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagellm.distributed.parallel_state import get_parallel_state, tp_all_gather, tp_all_reduce
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
        tp: str | None = None,
        row_offsets: list[int] | None = None,
        reduce: bool = True,
    ) -> None:
        super().__init__()
        state = get_parallel_state()
        self.tp = tp if state.tp_size > 1 else None
        self.tp_reduce = reduce
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
        # Where this rank's part starts in the checkpoint's tensors.
        self.tp_row_offsets = dict(
            zip(names, row_offsets or [state.tp_rank * size for size in sizes])
        )
        self.tp_in_offset = state.tp_rank * in_features
        self.tp_rank = state.tp_rank
        self.bias = (
            nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        )
        self._bias_loaded: set[str] = set()
        self._lib = ops.current_native_lib()
        self._qlib = ops.current_quant_lib()  # the quantized kernels (any run dtype)
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
        rows, cols = self.tp_spans(shard)
        if param_name == "bias":
            if self.bias is None:
                raise ValueError("checkpoint has a bias for a layer built without one")
            from pagellm.layers.quantization.base import as_float_tensor

            value = as_float_tensor(tensor)
            if rows is not None:
                value = value[rows[0] : rows[0] + rows[1]]
            elif self.tp == "row" and self.tp_rank != 0:
                value = torch.zeros_like(value)  # a partial sum gets the bias once
            start, size = self.shards[shard]
            if tuple(value.shape) != (size,):
                raise ValueError(
                    f"bias shard {shard}: checkpoint {tuple(value.shape)}, expected ({size},)"
                )
            self.bias.data[start : start + size].copy_(value)
            self._bias_loaded.add(shard)
            return
        if rows is not None or cols is not None:
            tensor = self.method.slice_tensor(param_name, tensor, rows, cols)
        self.method.load(self, param_name, tensor, shard)

    def tp_spans(self, shard: str) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """(output rows, input columns) of the checkpoint's tensor this rank keeps."""
        if self.tp in ("column", "vocab"):
            return (self.tp_row_offsets[shard], self.shards[shard][1]), None
        if self.tp == "row":
            return None, (self.tp_in_offset, self.in_features)
        return None, None

    def tp_lora(
        self, shard: str | None, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of a LoRA adapter's A [r, in] and B [out, r] for one shard:
        B's rows of a column-parallel layer, A's columns of a row-parallel one."""
        rows, cols = self.tp_spans(shard if shard is not None else next(iter(self.shards)))
        if rows is not None:
            b = b[rows[0] : rows[0] + rows[1]].contiguous()
        if cols is not None:
            a = a[:, cols[0] : cols[0] + cols[1]].contiguous()
        return a, b

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
        if self.tp == "row" and self.tp_reduce:
            y = tp_all_reduce(y)  # (the adapters' deltas are partial sums too)
        return y

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
            f"method={self.method.describe(self)}"
        )


class VocabEmbedding(Linear):
    """Token embedding; also the output projection (the LM head) when embeddings are tied.

    With tensor parallelism each rank holds ``ceil(vocab / tp)`` rows (the last rank's
    tail zero-padded): the embedding sums the ranks' lookups (each zero outside its
    range), the projection gathers the ranks' logits and drops the padding."""

    def __init__(self, vocab_size: int, hidden_size: int, role: str = "embedding") -> None:
        tp = get_parallel_state().tp_size
        super().__init__(hidden_size, -(-vocab_size // tp), role=role, tp="vocab")
        self.vocab_size = vocab_size
        self.vocab_start = self.tp_row_offsets["0"]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.method.embed(self, input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.out_features)
        out = self.method.embed(self, local.masked_fill(outside, 0))
        out.masked_fill_(outside[:, None], 0)
        return tp_all_reduce(out)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden @ weight^T: logits over the vocabulary."""
        logits = self.method.apply(self, hidden)
        if self.tp is None:
            return logits
        return tp_all_gather(logits)[:, : self.vocab_size]
