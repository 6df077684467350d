"""The LinearMethod interface, the unquantized method, and the shared machinery of the
quantized ones.

A quantized layer's weights end up as *runs*: consecutive output rows stored in one
format (a merged q/k/v projection whose shards share a format is one run; a GGUF file
that stores v in another type than q and k gives two). Each run is a ``PackedWeight``
(native kernels), a ``TorchPackedWeight`` (torch path) or a plain float matrix (types
without a kernel), optionally with a permutation of the input channels (GPTQ act-order):

    output rows:   [ run 0: q, k (Q4_K)   | run 1: v (Q6_K) ]
"""

from __future__ import annotations

import abc
import importlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from pagellm.layers import ops
from pagellm.layers.quantization.packed import BlockCodes, PackedWeight, TorchPackedWeight

if TYPE_CHECKING:
    from pagellm.config import QuantConfig
    from pagellm.layers.linear import Linear

logger = logging.getLogger(__name__)

# name -> (module under pagellm.layers.quantization, class)
_METHODS: dict[str, tuple[str, str]] = {
    "none": ("base", "UnquantizedLinearMethod"),
    "gguf": ("gguf", "GGUFLinearMethod"),
    "int8": ("int8", "Int8LinearMethod"),
    "int4": ("int4", "Int4LinearMethod"),
    "awq": ("awq", "AWQLinearMethod"),
    "gptq": ("gptq", "GPTQLinearMethod"),
}


def get_method_class(name: str) -> type[LinearMethod]:
    if name not in _METHODS:
        raise ValueError(f"unknown quantization method {name!r}; available: {', '.join(_METHODS)}")
    module, cls = _METHODS[name]
    return getattr(importlib.import_module(f"pagellm.layers.quantization.{module}"), cls)  # type: ignore[no-any-return]


class LinearMethod(abc.ABC):
    """Creates, loads and applies one layer's weights. One instance per layer."""

    name: ClassVar[str]

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def create_weights(self, layer: Linear) -> None:
        """Allocate what is known before loading (called from Linear.__init__)."""

    @abc.abstractmethod
    def load(self, layer: Linear, param_name: str, tensor: Any, shard: str) -> None:
        """Take one checkpoint tensor (``weight``, ``qweight``, ...) of one shard."""

    def finalize(self, layer: Linear) -> None:  # noqa: B027 (most methods need no step)
        """Called once every tensor is loaded (repacking happens here)."""

    @abc.abstractmethod
    def missing(self, layer: Linear) -> list[str]:
        """Shards (or parameters) the checkpoint has not filled."""

    @abc.abstractmethod
    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """x[M, in] -> [M, out] (bias included)."""

    @abc.abstractmethod
    def embed(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the weight (the layer used as an embedding table)."""

    def describe(self, layer: Linear) -> str:
        return self.name

    def native_runs(self, layer: Linear) -> list[Run] | None:
        """The layer as runs the native CPU path can execute (packed or float32 weights
        on the CPU), or None where it cannot."""
        return None

    def slice_tensor(self, param_name: str, tensor: Any, rows: Span, cols: Span) -> Any:
        """This tensor-parallel rank's part of one checkpoint tensor of [out, in]: output
        rows ``rows`` and input columns ``cols`` ((start, size) or None: all), in the
        tensor's own form (quantized blocks stay blocks). Methods whose checkpoints pack
        differently (AWQ, GPTQ) override it."""
        return slice_matrix(tensor, rows, cols)


class UnquantizedLinearMethod(LinearMethod):
    """``weight[out, in]`` in the run dtype; quantized checkpoint tensors are dequantized."""

    name = "none"

    def create_weights(self, layer: Linear) -> None:
        layer.weight = torch.nn.Parameter(
            torch.empty(layer.out_features, layer.in_features, dtype=ops.current_weight_dtype()),
            requires_grad=False,
        )
        layer.loaded_shards = set()

    def load(self, layer: Linear, param_name: str, tensor: Any, shard: str) -> None:
        if param_name != "weight":
            raise ValueError(f"{param_name!r} tensors need a quantized method, not 'none'")
        value = as_float_tensor(tensor)
        start, size = layer.shards[shard]
        if tuple(value.shape) != (size, layer.in_features):
            raise ValueError(
                f"shape mismatch: checkpoint {tuple(value.shape)} vs {(size, layer.in_features)}"
            )
        layer.weight.data[start : start + size].copy_(value)
        layer.loaded_shards.add(shard)

    def missing(self, layer: Linear) -> list[str]:
        return [f"weight#{s}" for s in layer.shards if s not in layer.loaded_shards]

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, layer.weight, layer.bias, layer._lib)

    def embed(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, layer.weight)
        _, dtype = layer.bias_device_dtype()
        return rows if rows.dtype == dtype else rows.to(dtype)

    def native_runs(self, layer: Linear) -> list[Run] | None:
        w = layer.weight
        native_dtypes = (torch.float32, torch.bfloat16, torch.float16)
        if w.device.type != "cpu" or w.dtype not in native_dtypes or layer._lib is None:
            return None
        return [Run(0, layer.out_features, w)]


def as_float_tensor(tensor: Any) -> torch.Tensor:
    """A checkpoint tensor as float32 (GGUF blocks dequantized)."""
    from pagellm.layers.quantization.gguf import GGUFRawTensor

    if isinstance(tensor, GGUFRawTensor):
        return torch.from_numpy(tensor.dequantize())
    if isinstance(tensor, np.ndarray):
        return torch.from_numpy(np.asarray(tensor, dtype=np.float32))
    return tensor.float()


def row_slice(tensor: Any, start: int, end: int) -> Any:
    """Rows [start, end) of a checkpoint matrix in its own form: a GGUF matrix keeps its
    blocks (they run along a row), floats stay floats (fused tensors split at load)."""
    from pagellm.layers.quantization.gguf import GGUFRawTensor

    if isinstance(tensor, GGUFRawTensor):
        return GGUFRawTensor(
            f"{tensor.name}[{start}:{end}]", tensor.qtype,
            np.ascontiguousarray(tensor.data[start:end]), (end - start, tensor.shape[1]),
        )  # fmt: skip
    return tensor[start:end]


Span = tuple[int, int] | None
"""(start, size) of a tensor-parallel slice; None: the whole dimension."""


def slice_matrix(tensor: Any, rows: Span, cols: Span) -> Any:
    """Rows and columns of a checkpoint matrix (float tensor, array or GGUF blocks).
    Rows past the end are zeros (a vocabulary padded to a multiple of the TP size);
    GGUF columns must fall on whole blocks."""
    from pagellm.layers.quantization.gguf import GGUFRawTensor

    if isinstance(tensor, GGUFRawTensor):
        data, (n, k) = tensor.data, tensor.shape
        if cols is not None:
            import gguf

            elems, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[tensor.qtype]]
            start, size = cols
            if start % elems or size % elems:
                raise ValueError(
                    f"{tensor.name}: tensor parallelism splits its {k} input columns into "
                    f"{size}, which is not a whole number of {tensor.qtype} blocks of {elems}; "
                    "use a smaller tensor_parallel_size, pipeline parallelism, or a GGUF "
                    "with a finer block type"
                )
            data = data[:, start // elems * nbytes : (start + size) // elems * nbytes]
            k = size
        if rows is not None:
            data, n = _rows(data, rows), rows[1]
        return GGUFRawTensor(tensor.name, tensor.qtype, np.ascontiguousarray(data), (n, k))
    if cols is not None:
        tensor = tensor[:, cols[0] : cols[0] + cols[1]]
    if rows is not None:
        tensor = _rows(tensor, rows)
    if isinstance(tensor, np.ndarray):
        return np.ascontiguousarray(tensor)
    return tensor.contiguous().clone()  # own storage: the full tensor can be freed


def packed_span(span: tuple[int, int], per: int, what: str) -> slice:
    """The slice of a packed dimension (``per`` channels per entry: 8 per int32 word, a
    group per scale) that holds the channels ``span``; ValueError when it would cut one."""
    start, size = span
    if start % per or size % per:
        raise ValueError(
            f"{what}: tensor parallelism gives each rank {size} channels, which do not "
            f"split into whole units of {per}; use a smaller tensor_parallel_size"
        )
    return slice(start // per, (start + size) // per)


def _rows(t: Any, rows: tuple[int, int]) -> Any:
    start, size = rows
    part = t[start : start + size]
    short = size - part.shape[0]
    if short <= 0:
        return part
    if isinstance(part, np.ndarray):
        return np.concatenate([part, np.zeros((short, *part.shape[1:]), dtype=part.dtype)])
    return torch.cat([part, part.new_zeros((short, *part.shape[1:]))])


@dataclass
class Run:
    start: int
    end: int
    weight: PackedWeight | TorchPackedWeight | torch.Tensor
    perm: torch.Tensor | None = None
    """Input channels in the order the codes use (GPTQ act-order); None: as they come."""


ShardWeight = BlockCodes | torch.Tensor | tuple[BlockCodes, np.ndarray]


class QuantizedLinearMethod(LinearMethod):
    """Stage each shard's checkpoint tensors; at finalize turn each shard into block codes
    (``to_codes``), merge consecutive shards of one format into runs and pack them."""

    required: ClassVar[tuple[str, ...]] = ("weight",)

    def create_weights(self, layer: Linear) -> None:
        layer.staged = {s: {} for s in layer.shards}
        layer.runs = []
        layer.fast_apply = None

    def load(self, layer: Linear, param_name: str, tensor: Any, shard: str) -> None:
        if param_name not in (*self.required, "weight"):
            raise ValueError(f"unexpected checkpoint tensor {param_name!r} for {self.name}")
        layer.staged[shard][param_name] = tensor

    def _complete(self, staged: dict[str, Any]) -> bool:
        return "weight" in staged or all(p in staged for p in self.required)

    def missing(self, layer: Linear) -> list[str]:
        if not hasattr(layer, "staged"):
            return []
        return [
            f"{'/'.join(self.required)}#{s}"
            for s, st in layer.staged.items()
            if not self._complete(st)
        ]

    @abc.abstractmethod
    def to_codes(self, layer: Linear, shard: str, staged: dict[str, Any]) -> ShardWeight:
        """The shard as block codes (optionally with an input permutation), or as a float
        matrix where the method has no kernel for what the checkpoint holds."""

    def finalize(self, layer: Linear) -> None:
        items: list[tuple[int, int, ShardWeight]] = []
        for shard, (start, size) in layer.shards.items():
            w = self.to_codes(layer, shard, layer.staged[shard])
            items.append((start, start + size, w))
        del layer.staged
        runs: list[tuple[int, int, list[ShardWeight]]] = []
        for start, end, w in items:
            if runs and _same_format(runs[-1][2][-1], w):
                runs[-1] = (runs[-1][0], end, [*runs[-1][2], w])
            else:
                runs.append((start, end, [w]))
        lib = layer._qlib
        device, dtype = layer.bias_device_dtype()
        for i, (start, end, parts) in enumerate(runs):
            first = parts[0]
            perm = None
            if isinstance(first, tuple):
                first, perm_np = first
                perm = torch.from_numpy(perm_np).to(device)
            if isinstance(first, BlockCodes):
                bc = BlockCodes.concat([p[0] if isinstance(p, tuple) else p for p in parts])  # type: ignore[misc]
                weight: PackedWeight | TorchPackedWeight | torch.Tensor
                if lib is not None and device.type == "cpu":
                    bias = None if layer.bias is None else layer.bias.data[start:end]
                    if bias is not None and bias.dtype != torch.float32:
                        bias = bias.float()  # the kernel adds a float32 bias
                    weight = PackedWeight(bc, lib, bias)
                    layer.register_buffer(f"run{i}", weight.data)
                else:
                    weight = TorchPackedWeight(bc, device, dtype)
                    layer.register_buffer(f"run{i}", weight.codes)
            else:
                weight = torch.cat([as_float_tensor(p) for p in parts]).to(
                    device=device, dtype=dtype
                )
                layer.register_buffer(f"run{i}", weight)
            layer.runs.append(Run(start, end, weight, perm))
        only = layer.runs[0]
        if len(layer.runs) == 1 and only.perm is None and isinstance(only.weight, PackedWeight):
            layer.fast_apply = only.weight  # the common case: one call, bias included

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        fast = layer.fast_apply
        if fast is not None:
            if x.dtype != torch.float32:  # (a bf16/fp16 model on the packed kernels)
                return fast(x.float()).to(x.dtype)  # type: ignore[no-any-return]
            return fast(x)  # type: ignore[no-any-return]
        runs: list[Run] = layer.runs
        bias = layer.bias
        if len(runs) == 1 and isinstance(runs[0].weight, torch.Tensor):
            return ops.linear(x, runs[0].weight, bias, layer._lib)
        y = torch.empty((x.shape[0], layer.out_features), dtype=x.dtype, device=x.device)
        for run in runs:
            out = y[:, run.start : run.end]
            b = None if bias is None else bias[run.start : run.end]
            w = run.weight
            xin = x if run.perm is None else x.index_select(1, run.perm)
            if isinstance(w, PackedWeight):
                if x.dtype != torch.float32:
                    out.copy_(w(xin.float()))
                else:
                    w(xin, out)  # quantizes xin itself (cheap next to the matmul)
            elif isinstance(w, TorchPackedWeight):
                out.copy_(F.linear(xin, w.dequantize(), b))
            else:
                out.copy_(ops.linear(xin, w, b, layer._lib))
        return y

    def embed(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        (run,) = layer.runs
        w = run.weight
        if isinstance(w, torch.Tensor):
            return F.embedding(ids, w)
        _, dtype = layer.bias_device_dtype()
        return w.dequantize_rows(ids).to(dtype)

    def native_runs(self, layer: Linear) -> list[Run] | None:
        for run in layer.runs:
            w = run.weight
            if isinstance(w, TorchPackedWeight):
                return None
            if isinstance(w, torch.Tensor) and (w.device.type != "cpu" or w.dtype != torch.float32):
                return None
        return list(layer.runs)

    def describe(self, layer: Linear) -> str:
        parts = []
        for run in layer.runs:
            w = run.weight
            if isinstance(w, (PackedWeight, TorchPackedWeight)):
                parts.append(f"{w.kind}x{w.nsub}")
            else:
                parts.append(str(w.dtype).replace("torch.", ""))
        return f"{self.name}[{','.join(parts)}]"


def _same_format(a: ShardWeight, b: ShardWeight) -> bool:
    if isinstance(a, tuple) or isinstance(b, tuple):
        return False  # each permuted shard has its own input order
    if isinstance(a, BlockCodes) and isinstance(b, BlockCodes):
        return a.format == b.format
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
