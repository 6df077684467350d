"""Gemma 3 text models (Gemma3ForCausalLM).

Differences from the Llama decoder: local (sliding-window) and global attention layers
interleaved (``layer_types``, or every ``sliding_window_pattern``-th layer global in
older configs), each kind with its own RoPE base (and the global one with its scaling);
RMSNorm that multiplies by (1 + weight) (stored here as 1 + weight at load, so the plain
RMSNorm kernels serve); norms before and after both the attention and the MLP; q/k
RMSNorm; GELU-tanh MLP; embeddings scaled by sqrt(hidden_size); attention scaled by
query_pre_attn_scalar ** -0.5; optional final logit soft-capping (attention logits
are not capped in Gemma 3, whatever attn_logit_softcapping says).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagellm.distributed.parallel_state import get_parallel_state
from pagellm.layers.linear import VocabEmbedding
from pagellm.layers.norm import RMSNorm
from pagellm.layers.rotary import RotaryEmbedding
from pagellm.models.llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    head_dim_of,
    stage_embedding,
    stage_layers,
)


def gemma3_layer_types(cfg: Any) -> list[str]:
    types = getattr(cfg, "layer_types", None)
    if types:
        return list(types)
    pattern = int(getattr(cfg, "sliding_window_pattern", 6) or 6)
    return [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
        for i in range(cfg.num_hidden_layers)
    ]


def gemma3_rope(cfg: Any, layer_type: str) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) of one layer kind, from transformers 5's per-kind rope_parameters
    or the older rope_theta / rope_local_base_freq / rope_scaling fields."""
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and layer_type in params and params[layer_type]:
        p = dict(params[layer_type])
        theta = float(p.get("rope_theta", 10000.0))
        kind = p.get("rope_type", p.get("type", "default"))
        return theta, (p if kind != "default" else None)
    if layer_type == "sliding_attention":
        return float(getattr(cfg, "rope_local_base_freq", 10000.0)), None
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(getattr(cfg, "rope_theta", 1_000_000.0)), scaling


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, rotary: RotaryEmbedding, sliding_window: int | None) -> None:
        super().__init__()
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        bias = bool(getattr(cfg, "attention_bias", False))
        # The Llama attention with q/k norms, scaled by query_pre_attn_scalar ** -0.5. Gemma
        # 3 configs carry attn_logit_softcapping, but Gemma 3 does not soft-cap attention
        # (transformers ignores the field too; Gemma 2 did).
        scale = float(getattr(cfg, "query_pre_attn_scalar", head_dim_of(cfg))) ** -0.5
        self.self_attn = LlamaAttention(cfg, rotary, bias, bias, True, sliding_window, scale)
        self.mlp = LlamaMLP(h, cfg.intermediate_size, act=act or "gelu_pytorch_tanh")
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm.norm(hidden))
        hidden = hidden + self.post_attention_layernorm.norm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm.norm(hidden))
        return hidden + self.post_feedforward_layernorm.norm(mlp)


class Gemma3Model(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.embed_tokens = stage_embedding(cfg, bool(getattr(cfg, "tie_word_embeddings", True)))
        # transformers multiplies by the scale cast to the weights' dtype.
        self.embed_scale = float(torch.tensor(math.sqrt(cfg.hidden_size), dtype=torch.float32))
        head_dim = head_dim_of(cfg)
        rotaries = {}
        for kind in ("sliding_attention", "full_attention"):
            theta, scaling = gemma3_rope(cfg, kind)
            rotaries[kind] = RotaryEmbedding(
                head_dim, head_dim, cfg.max_position_embeddings, theta, scaling
            )
        self.rotary_local = rotaries["sliding_attention"]
        self.rotary_global = rotaries["full_attention"]
        window = int(cfg.sliding_window) if getattr(cfg, "sliding_window", None) else None
        self.windows = [
            window if kind == "sliding_attention" else None for kind in gemma3_layer_types(cfg)
        ]
        self.layers, self.local_layers = stage_layers(
            cfg,
            lambda k: Gemma3DecoderLayer(
                cfg, rotaries[k], window if k == "sliding_attention" else None
            ),
            gemma3_layer_types(cfg),
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_last_stage = get_parallel_state().is_last_stage

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        hidden_in: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if hidden_in is None:
            assert self.embed_tokens is not None
            hidden = self.embed_tokens(input_ids) * self.embed_scale
        else:
            hidden = hidden_in
        for i in self.local_layers:
            hidden = self.layers[i](positions, hidden)
        return self.norm.norm(hidden) if self.is_last_stage else hidden


class Gemma3ForCausalLM(LlamaForCausalLM):
    stacked_params = LlamaForCausalLM.stacked_params

    def __init__(self, cfg: Any) -> None:
        nn.Module.__init__(self)
        self.config = cfg
        self.model = Gemma3Model(cfg)  # type: ignore[assignment]
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = (
            None
            if self.tie_word_embeddings or not get_parallel_state().is_last_stage
            else VocabEmbedding(cfg.vocab_size, cfg.hidden_size, role="lm_head")
        )
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)

    def layer_windows(self) -> list[int | None]:
        return list(self.model.windows)  # type: ignore[arg-type]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        if self.final_softcap:
            cap = float(self.final_softcap)
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        def renamed() -> Iterable[tuple[str, Any]]:
            for name, tensor in weights:
                # A multimodal checkpoint's text half.
                for prefix in ("model.language_model.", "language_model.model."):
                    if name.startswith(prefix):
                        name = "model." + name[len(prefix) :]
                if name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision")):
                    continue
                yield name, tensor

        super().load_weights(renamed())
        if getattr(self.config, "pagellm_gguf_norms", False):
            return  # llama.cpp's converter already stored 1 + weight
        # Gemma's RMSNorm multiplies by (1 + weight): store it that way once.
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, RMSNorm):
                    module.weight.add_(1.0)
