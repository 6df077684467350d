"""Mixture-of-experts decoders: Qwen3-MoE (Qwen3MoeForCausalLM) and Mixtral
(MixtralForCausalLM).

The attention half is the Llama/Qwen3 one. The MLP of a sparse layer is a router (a
Linear to one logit per expert) and E expert MLPs (each a merged gate/up Linear and a
down Linear, so every quantization method applies to experts as to dense layers). Each
token goes to its top-k experts by softmax probability, renormalized over the k where the
config asks (Mixtral always; Qwen3-MoE with norm_topk_prob). Tokens are grouped by
expert: each expert runs once per step over all of its tokens, and its outputs are added
back weighted (so a step costs the active experts' weights once, not once per token).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagellm.distributed.parallel_state import tp_all_reduce
from pagellm.layers.linear import Linear
from pagellm.layers.quantization.base import as_float_tensor
from pagellm.models.llama import LlamaForCausalLM, LlamaMLP
from pagellm.models.qwen3 import Qwen3ForCausalLM


class SparseMoE(nn.Module):
    def __init__(
        self, hidden: int, intermediate: int, num_experts: int, top_k: int, renormalize: bool,
        act: str = "silu",
    ) -> None:  # fmt: skip
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} with {num_experts} experts")
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = Linear(hidden, num_experts, bias=False, role="router")
        self.experts = nn.ModuleList(
            LlamaMLP(hidden, intermediate, act=act, reduce=False) for _ in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        flat = chosen.flatten()
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        tokens = order // self.top_k
        w = weights.flatten()[order].to(x.dtype)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = tokens[start : start + n]
            y = self.experts[e](x.index_select(0, rows))
            out.index_add_(0, rows, y * w[start : start + n, None])
            start += n
        # Tensor parallel: each expert's output was this rank's partial sum; one
        # all-reduce for all of them (the identity on one worker).
        return tp_all_reduce(out)


def split_stacked_experts(weights: Iterable[tuple[str, Any]]) -> Iterable[tuple[str, Any]]:
    """transformers 5's stacked expert tensors (``experts.gate_up_proj`` [E, 2I, H], gate
    rows first, and ``experts.down_proj`` [E, H, I]) as one matrix per expert; other
    tensors pass through."""
    for name, tensor in weights:
        if name.endswith(".experts.gate_up_proj"):
            t = as_float_tensor(tensor)
            inter = t.shape[1] // 2
            base = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                yield f"{base}{e}.gate_proj.weight", t[e, :inter]
                yield f"{base}{e}.up_proj.weight", t[e, inter:]
        elif name.endswith(".experts.down_proj"):
            t = as_float_tensor(tensor)
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                yield f"{base}{e}.down_proj.weight", t[e]
        else:
            yield name, tensor


def _replace_mlps(model: LlamaForCausalLM, cfg: Any, sparse: list[bool]) -> None:
    num_experts = int(getattr(cfg, "num_experts", None) or cfg.num_local_experts)
    top_k = int(cfg.num_experts_per_tok)
    inter = int(getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)
    renorm = bool(getattr(cfg, "norm_topk_prob", True))
    act = getattr(cfg, "hidden_act", "silu")
    for i, (layer, is_sparse) in enumerate(zip(model.model.layers, sparse)):
        if is_sparse and i in model.model.local_layers:
            layer.mlp = SparseMoE(cfg.hidden_size, inter, num_experts, top_k, renorm, act)  # type: ignore[union-attr,assignment]
    # The single native call runs dense Llama layers only.
    model.model.native_stack_enabled = False


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
        dense = set(getattr(cfg, "mlp_only_layers", None) or [])
        num_experts = int(getattr(cfg, "num_experts", 0) or 0)
        sparse = [
            i not in dense and num_experts > 0 and (i + 1) % step == 0
            for i in range(cfg.num_hidden_layers)
        ]
        _replace_mlps(self, cfg, sparse)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        super().load_weights(split_stacked_experts(weights))


class MixtralForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        _replace_mlps(self, cfg, [True] * cfg.num_hidden_layers)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        names = ((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."),
                 (".w2.", ".down_proj."))  # fmt: skip

        def renamed() -> Iterable[tuple[str, Any]]:
            for name, tensor in weights:
                if ".block_sparse_moe." in name:
                    for old, new in names:
                        name = name.replace(old, new)
                yield name, tensor

        super().load_weights(split_stacked_experts(renamed()))
