"""LoRA inside ``Linear``, batched by adapter group, and the worker's adapter manager.

A step's tokens are split into groups, one per adapter present (base-model tokens form no
group). For each targeted Linear and each group g with rows R_g:

    shrink:  s = x[R_g] A_gᵀ          [n_g, r_q + r_k + ...]   (all shards of the layer)
    expand:  y[R_g] += s B_gᵀ         each rank row writes only its shard's columns

(the shrink/expand split of Punica and S-LoRA). On CPU fp32 both run in one native call
per Linear that serves every group (csrc/cpu_ops.c ``pagellm_lora_apply``); inside the
native layer stack the same call follows each of a layer's four linears, with the step's
groups described once per step (``LoRAManager.stack_step``), so a step with adapters is
still one call into C. Elsewhere (GPU, bf16, no native kernels) each group costs two
torch matmuls. Rows of a group are a slice when its tokens are contiguous, else an index.

Adapter residency (LoRAManager): ``max_loras`` adapters are *active* (installed in the
layers, usable in a step); up to ``max_cpu_loras`` stay loaded in host memory in an LRU,
so a request for a recently used adapter does not read its directory again.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch

from pagellm.lora.adapter import TARGETS, LoRAAdapter, load_adapter
from pagellm.lora.request import LoRARequest

logger = logging.getLogger(__name__)

Rows = slice | torch.Tensor
# (adapter id, its token rows as a slice or index, the same rows as an int64 CPU tensor)
Group = tuple[int, Rows, torch.Tensor]
_GROUPS: ContextVar[list[Group] | None] = ContextVar("pagellm_lora_groups", default=None)
_STACK: ContextVar[Any] = ContextVar("pagellm_lora_stack", default=None)

# The Linears of a Llama-family layer, in the order of csrc/llama_stack.c.
STACK_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@contextlib.contextmanager
def set_lora_groups(groups: list[Group] | None, stack: Any = None) -> Iterator[None]:
    """The step's (adapter id, token rows) groups, read by every LoRA layer, and (for the
    native layer stack) the same groups as one descriptor array per step."""
    token = _GROUPS.set(groups or None)
    token_stack = _STACK.set(stack if groups else None)
    try:
        yield
    finally:
        _GROUPS.reset(token)
        _STACK.reset(token_stack)


def lora_active() -> bool:
    return _GROUPS.get() is not None


def lora_stack_step() -> Any:
    """(descriptor array [layers, 4, groups, 8], its scratch tensor) for the native
    stack, or None when the step has no adapter tokens."""
    return _STACK.get()


class LinearLoRA:
    """The adapters installed in one Linear.

    Per adapter: A [R, in] with the adapter's shards stacked along the rank (q, k, v for
    a QKV layer), Bᵀ [R, out] with each shard's B (already scaled) at its output columns
    and zeros elsewhere, and per rank row the column range it writes. On CPU fp32 one
    native call per Linear (csrc/cpu_ops.c ``pagellm_lora_apply``) serves every group and
    skips the zeros; elsewhere two torch matmuls per group."""

    def __init__(self, shards: dict[str, tuple[int, int]], out_features: int, lib: Any) -> None:
        self.shards = shards
        self.out_features = out_features
        self.lib = lib
        # id -> (A, Bᵀ, column ranges [2, R] int64, descriptor template)
        self.adapters: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]] = {}

    def install(
        self, lora_id: int, parts: dict[str | None, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        rank = sum(a.shape[0] for a, _ in parts.values())
        first_a = next(iter(parts.values()))[0]
        bt = first_a.new_zeros(rank, self.out_features)
        cols = torch.zeros(2, rank, dtype=torch.int64)
        a_list, r0 = [], 0
        for shard, (a, b) in parts.items():
            start, size = (
                self.shards[shard] if shard is not None else next(iter(self.shards.values()))
            )
            r = a.shape[0]
            a_list.append(a)
            bt[r0 : r0 + r, start : start + size] = b.t()
            cols[0, r0 : r0 + r], cols[1, r0 : r0 + r] = start, start + size
            r0 += r
        a_all = torch.cat(a_list).contiguous()
        template = np.array(
            [
                0,
                0,
                a_all.data_ptr(),
                bt.data_ptr(),
                cols[0].data_ptr(),
                cols[1].data_ptr(),
                rank,
                0,
            ],
            dtype=np.int64,
        )
        self.adapters[lora_id] = (a_all, bt, cols, template)

    def remove(self, lora_id: int) -> None:
        self.adapters.pop(lora_id, None)

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        groups = _GROUPS.get()
        if groups is None:
            return y
        present = [(self.adapters[g[0]], g) for g in groups if g[0] in self.adapters]
        if not present:  # no adapter of this step targets this layer
            return y
        if (
            self.lib is not None
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and x.is_contiguous()
            and y.is_contiguous()
        ):
            desc = np.empty((len(present), 8), dtype=np.int64)
            scratch = torch.empty(sum(e[3][6] * g[2].numel() for e, g in present))
            offset = 0
            for i, ((_, _, _, template), (_, _, rows64)) in enumerate(present):
                n = rows64.numel()
                desc[i] = template
                desc[i, 0], desc[i, 1] = rows64.data_ptr(), n
                desc[i, 7] = scratch.data_ptr() + 4 * offset
                offset += n * int(template[6])
            self.lib.pagellm_lora_apply(
                x.data_ptr(), y.data_ptr(), x.shape[1], y.shape[1], desc.ctypes.data,
                len(present), torch.get_num_threads(),
            )  # fmt: skip
            return y
        for (a, bt, _, _), (_, rows, _) in present:
            if isinstance(rows, slice):
                y[rows].addmm_(x[rows] @ a.t(), bt)  # in place on the group's rows
            else:
                y.index_add_(0, rows, (x[rows] @ a.t()) @ bt)
        return y


class LoRAManager:
    """Which adapters are loaded and which are installed in the model's layers."""

    def __init__(
        self, model: Any, hf_config: Any, max_loras: int, max_cpu_loras: int, max_rank: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:  # fmt: skip
        from pagellm.layers.linear import Linear

        self.hf_config = hf_config
        self.max_loras = max_loras
        self.max_cpu_loras = max(max_cpu_loras, max_loras)
        self.max_rank = max_rank
        self.dtype, self.device = dtype, device
        # (layer index, PEFT module) -> (the Linear's LoRA slot, shard, the Linear); this
        # pipeline stage's layers only, each adapter cut to this TP rank's part.
        self.slots: dict[tuple[int, str], tuple[LinearLoRA, str | None, Linear]] = {}
        modules = dict(model.named_modules())
        layers = list(getattr(model.model, "local_layers", range(int(hf_config.num_hidden_layers))))
        for i in layers:
            for peft_name, (ours, shard) in TARGETS.items():
                lin = modules.get(f"model.layers.{i}.{ours}")
                if not isinstance(lin, Linear):
                    raise ValueError(f"LoRA: the model has no {ours} in layer {i}")
                if lin.lora is None:
                    lin.lora = LinearLoRA(lin.shards, lin.out_features, lin._lib)
                self.slots[(i, peft_name)] = (lin.lora, shard, lin)
        self.loaded: OrderedDict[int, tuple[LoRARequest, LoRAAdapter]] = OrderedDict()
        self.active: set[int] = set()
        # Per layer, the LoRA slots of its four Linears in the native stack's order.
        self._stack_slots = [
            [modules[f"model.layers.{i}.{name}"].lora for name in STACK_LINEARS]  # type: ignore[union-attr]
            for i in layers
        ]
        # id -> [layers, 4, 8] descriptor templates (rank 0 where it targets nothing)
        self._stack_templates: dict[int, np.ndarray] = {}

    def _install(self, lora_id: int, adapter: LoRAAdapter) -> None:
        per_linear: dict[
            int, tuple[LinearLoRA, dict[str | None, tuple[torch.Tensor, torch.Tensor]]]
        ] = {}
        for (layer, module), (a, b) in adapter.weights.items():
            entry = self.slots.get((layer, module))
            if entry is None:
                continue  # a layer of another pipeline stage
            slot, shard, lin = entry
            per_linear.setdefault(id(slot), (slot, {}))[1][shard] = lin.tp_lora(shard, a, b)
        for slot, parts in per_linear.values():
            slot.install(lora_id, parts)
        self.active.add(lora_id)
        templates = np.zeros((len(self._stack_slots), len(STACK_LINEARS), 8), dtype=np.int64)
        for i, slots in enumerate(self._stack_slots):
            for j, slot in enumerate(slots):
                entry = slot.adapters.get(lora_id)
                if entry is not None:
                    templates[i, j] = entry[3]
        self._stack_templates[lora_id] = templates

    def _uninstall(self, lora_id: int) -> None:
        for slots in self._stack_slots:  # every LoRA-carrying Linear, once
            for slot in slots:
                slot.remove(lora_id)
        self.active.discard(lora_id)
        self._stack_templates.pop(lora_id, None)

    def stack_step(self, groups: list[Group]) -> tuple[np.ndarray, torch.Tensor]:
        """The step's groups as the native stack's descriptors: [layers, 4, groups, 8]
        (templates with each group's rows and scratch filled in) and the scratch they use.
        Linears run one after another, so every layer shares one scratch per group."""
        desc = np.stack([self._stack_templates[g[0]] for g in groups], axis=2)
        widths = [int(self._stack_templates[g[0]][:, :, 6].max()) for g in groups]
        sizes = [w * g[2].numel() for w, g in zip(widths, groups)]
        scratch = torch.empty(max(sum(sizes), 1))
        offset = 0
        for k, ((_, _, rows64), size) in enumerate(zip(groups, sizes)):
            desc[:, :, k, 0] = rows64.data_ptr()
            desc[:, :, k, 1] = rows64.numel()
            desc[:, :, k, 7] = scratch.data_ptr() + 4 * offset
            offset += size
        return np.ascontiguousarray(desc), scratch

    def load(self, req: LoRARequest) -> LoRAAdapter:
        """The adapter's weights, read from its directory unless already in memory."""
        lora_id = req.lora_int_id
        if lora_id in self.loaded:
            self.loaded.move_to_end(lora_id)
            return self.loaded[lora_id][1]
        adapter = load_adapter(
            req.lora_path, self.hf_config, self.max_rank, self.dtype, self.device
        )
        self.loaded[lora_id] = (req, adapter)
        logger.info("LoRA adapter %s (id %d, rank %d) loaded from %s",
                    req.lora_name, lora_id, adapter.rank, req.lora_path)  # fmt: skip
        return adapter

    def prepare(self, needed: dict[int, LoRARequest]) -> None:
        """Make the step's adapters active (loading them if they are not in memory)."""
        if len(needed) > self.max_loras:  # the scheduler keeps this from happening
            raise RuntimeError(f"{len(needed)} adapters in one step, max_loras {self.max_loras}")
        for lora_id, req in needed.items():
            self.load(req)
            if lora_id not in self.active:
                for other in sorted(self.active - set(needed)):
                    if len(self.active) < self.max_loras:
                        break
                    self._uninstall(other)
                self._install(lora_id, self.loaded[lora_id][1])
        while len(self.loaded) > self.max_cpu_loras:
            victim = next(i for i in self.loaded if i not in needed)
            self.remove(victim)

    def remove(self, lora_id: int) -> bool:
        """Drop an adapter from the layers and from memory."""
        self._uninstall(lora_id)
        return self.loaded.pop(lora_id, None) is not None
