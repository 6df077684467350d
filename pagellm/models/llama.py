"""Llama-family decoder (Llama, Mistral; Qwen2 and Qwen3 subclass it).

The forward pass takes one flat batch (``input_ids[T]``, ``positions[T]``) and the
per-step attention metadata from the forward context. The residual stream is carried
beside the hidden state so each RMSNorm also does the residual add.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagellm.distributed.parallel_state import (
    get_parallel_state,
    kv_head_partition,
    pp_layer_range,
    tp_partition,
)
from pagellm.layers import ops
from pagellm.layers.activation import GATED_ACTIVATIONS, SiluAndMul
from pagellm.layers.attention import Attention, AttentionSpec, get_forward_context
from pagellm.layers.linear import Linear, VocabEmbedding
from pagellm.layers.norm import RMSNorm
from pagellm.layers.quantization.base import as_float_tensor
from pagellm.layers.rotary import RotaryEmbedding, get_rope_parameters
from pagellm.lora.layers import lora_active, lora_stack_step

logger = logging.getLogger(__name__)


def head_dim_of(cfg: Any) -> int:
    head_dim = getattr(cfg, "head_dim", None)
    return int(head_dim) if head_dim else cfg.hidden_size // cfg.num_attention_heads


def sliding_windows(cfg: Any) -> list[int | None]:
    """Each layer's sliding window (None: full attention), from the config: transformers
    5's ``layer_types``, Qwen2's ``use_sliding_window`` / ``max_window_layers``, or a
    ``sliding_window`` that applies to every layer (Mistral, Phi-3)."""
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return [None] * n
    types = getattr(cfg, "layer_types", None)
    if types:
        return [int(window) if t == "sliding_attention" else None for t in types]
    if not getattr(cfg, "use_sliding_window", True):
        return [None] * n
    first = getattr(cfg, "max_window_layers", None)
    if first is not None and hasattr(cfg, "use_sliding_window"):
        return [int(window) if i >= first else None for i in range(n)]
    return [int(window)] * n


def build_rotary(cfg: Any) -> RotaryEmbedding:
    """One rotary table for the whole model (every layer uses the same one)."""
    head_dim = head_dim_of(cfg)
    theta, scaling = get_rope_parameters(cfg)
    rotary_dim = int(head_dim * float(getattr(cfg, "partial_rotary_factor", 1.0)))
    return RotaryEmbedding(head_dim, rotary_dim, cfg.max_position_embeddings, theta, scaling)


class LlamaAttention(nn.Module):
    def __init__(
        self, cfg: Any, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool, qk_norm: bool,
        window: int | None = None, scale: float | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        # This rank's heads (all of them without tensor parallelism): a share of the
        # query heads and of the KV heads, or the one KV head its queries read.
        total_heads = cfg.num_attention_heads
        q_start, self.num_heads = tp_partition(total_heads, "num_attention_heads")
        kv_start, self.num_kv_heads = kv_head_partition(
            getattr(cfg, "num_key_value_heads", None) or total_heads
        )
        self.head_dim = hd = head_dim_of(cfg)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(
            cfg.hidden_size,
            [self.q_size, self.kv_size, self.kv_size],
            bias=qkv_bias,
            shard_names=["q", "k", "v"],
            tp="column",
            row_offsets=[q_start * hd, kv_start * hd, kv_start * hd],
        )
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=o_bias, tp="row")
        self.rotary_emb = rotary
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim,
            self.head_dim**-0.5 if scale is None else scale, AttentionSpec(sliding_window=window),
        )  # fmt: skip

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm.norm(q.reshape(-1, self.num_heads, self.head_dim)).view(-1, self.q_size)
            k = self.k_norm.norm(k.reshape(-1, self.num_kv_heads, self.head_dim)).view(
                -1, self.kv_size
            )
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up merged; also every MoE expert."""

    def __init__(
        self, hidden: int, intermediate: int, bias: bool = False, act: str = "silu",
        reduce: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        # Tensor parallel: each rank holds a share of the intermediate columns; the down
        # projection's partial sums are all-reduced here (``reduce``) or by the caller
        # (a mixture of experts reduces once for all its experts).
        _, intermediate = tp_partition(intermediate, "intermediate_size")
        if act not in GATED_ACTIVATIONS:
            raise ValueError(
                f"activation {act!r} is not supported ({', '.join(sorted(GATED_ACTIVATIONS))})"
            )
        self.gate_up_proj = Linear(
            hidden, [intermediate, intermediate], bias=bias, shard_names=["gate", "up"],
            tp="column",
        )  # fmt: skip
        self.down_proj = Linear(intermediate, hidden, bias=bias, tp="row", reduce=reduce)
        self.act = GATED_ACTIVATIONS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, cfg: Any, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool, qk_norm: bool,
        window: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, qkv_bias, o_bias, qk_norm, window)
        self.mlp = LlamaMLP(
            cfg.hidden_size, cfg.intermediate_size, bool(getattr(cfg, "mlp_bias", False)),
            getattr(cfg, "hidden_act", "silu"),
        )  # fmt: skip
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class MissingLayer(nn.Module):
    """A decoder layer held by another pipeline stage (no weights here); keeps the
    layers' indices, so checkpoint and adapter names stay global."""

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("this layer runs on another pipeline stage")


def stage_layers(cfg: Any, build: Any, specs: Iterable[Any]) -> tuple[nn.ModuleList, range]:
    """Every layer index, built (``build(spec)``) on this pipeline stage's range only."""
    local = pp_layer_range(int(cfg.num_hidden_layers))
    layers = nn.ModuleList(
        build(spec) if i in local else MissingLayer() for i, spec in enumerate(specs)
    )
    return layers, local


def stage_embedding(cfg: Any, tied: bool) -> VocabEmbedding | None:
    """The token embedding where this stage needs it: the first stage embeds, the last
    projects with it when the LM head is tied."""
    pp = get_parallel_state()
    if pp.is_first_stage or (tied and pp.is_last_stage):
        return VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
    return None


class LlamaModel(nn.Module):
    """The decoder; with pipeline parallelism, this stage's layers only. A stage after
    the first takes the previous stage's hidden states (``hidden_in``: the residual
    stream, already summed); one before the last returns its residual stream."""

    def __init__(self, cfg: Any, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = stage_embedding(cfg, bool(getattr(cfg, "tie_word_embeddings", False)))
        rotary = build_rotary(cfg)
        self.rotary = rotary
        self.layers, self.local_layers = stage_layers(
            cfg, lambda w: LlamaDecoderLayer(cfg, rotary, qkv_bias, o_bias, qk_norm, w),
            sliding_windows(cfg),
        )  # fmt: skip
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_last_stage = get_parallel_state().is_last_stage
        # The CPU fast path (see _native_stack); tests switch it off to compare. Its one
        # call runs every layer without a collective: one worker only.
        self.native_stack_enabled = get_parallel_state().world_size == 1
        self._stack: tuple[Any, ...] | None = None

    def _native_stack(self, meta: Any) -> Any:
        """The layers as one native call (csrc/llama_stack.c), when every part of them runs
        on pagellm's CPU kernels; else None (the modules run one by one). Built once the KV
        cache is bound, and again if it is rebound."""
        if (
            not self.native_stack_enabled
            or meta.backend is None
            or meta.backend.name != "cpu_native"
            # Layers in several KV cache groups address the cache through several block
            # tables; the stack takes one (mixed sliding/full models run module by module).
            or len(get_forward_context().group_metadata) > 1
        ):
            return None
        first: Any = self.layers[0]
        key = first.self_attn.attn.kv_cache.k.data_ptr()
        if self._stack is not None and self._stack[0] == key:
            return self._stack[1]
        self._stack = (key, build_native_stack(self))
        return self._stack[1]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        hidden_in: torch.Tensor | None = None,
    ) -> torch.Tensor:
        meta = get_forward_context().attn_metadata
        # A step with LoRA tokens runs in the stack when the runner described its adapter
        # groups for it (CPU fp32), else the modules (each Linear adds its groups' deltas).
        lora = lora_stack_step()
        stack = None if lora_active() and lora is None else self._native_stack(meta)
        if stack is not None:
            lib, desc = stack
            assert self.embed_tokens is not None  # (one worker: every stage is the first)
            hidden = self.embed_tokens(input_ids).contiguous()
            data = meta.backend_data
            if lora is not None:  # this step's adapter groups (their arrays live in `lora`)
                desc.lora, desc.lora_groups = lora[0].ctypes.data, lora[0].shape[2]
            else:
                desc.lora, desc.lora_groups = None, 0
            lib.pagellm_llama_stack(
                ctypes.byref(desc), hidden.data_ptr(), positions.data_ptr(), hidden.shape[0],
                meta.slot_mapping.data_ptr(), data.block_tables.data_ptr(),
                data.block_tables.shape[1], data.seq_lens.data_ptr(),
                data.query_start_loc.data_ptr(), data.token_to_seq.data_ptr(), meta.max_seq_len,
                torch.get_num_threads(),
            )  # fmt: skip
            return hidden
        if hidden_in is None:
            assert self.embed_tokens is not None
            hidden = self.embed_tokens(input_ids)
        else:
            hidden = hidden_in
        residual: torch.Tensor | None = None
        for i in self.local_layers:
            hidden, residual = self.layers[i](positions, hidden, residual)
        if not self.is_last_stage:
            return hidden if residual is None else hidden + residual
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Causal LM head over LlamaModel; weights load from Hugging Face tensor names."""

    # Checkpoint tensor -> (our parameter, shard) for merged projections.
    stacked_params = (
        ("q_proj", "qkv_proj", "q"),
        ("k_proj", "qkv_proj", "k"),
        ("v_proj", "qkv_proj", "v"),
        ("gate_proj", "gate_up_proj", "gate"),
        ("up_proj", "gate_up_proj", "up"),
    )

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.config = cfg
        qkv_bias, o_bias, qk_norm = self.arch_flags(cfg)
        self.model = LlamaModel(cfg, qkv_bias, o_bias, qk_norm)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = (
            None
            if self.tie_word_embeddings or not get_parallel_state().is_last_stage
            else VocabEmbedding(cfg.vocab_size, cfg.hidden_size, role="lm_head")
        )

    @staticmethod
    def arch_flags(cfg: Any) -> tuple[bool, bool, bool]:
        """(bias on q/k/v, bias on o_proj, RMSNorm on q and k)."""
        bias = bool(getattr(cfg, "attention_bias", False))
        return bias, bias, False

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        hidden_in: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, hidden_in)  # type: ignore[no-any-return]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        assert head is not None, "logits are computed on the last pipeline stage"
        return head.project(hidden)  # type: ignore[no-any-return,operator]

    def layer_windows(self) -> list[int | None]:
        """Every layer's sliding window (None: full), this stage's or not."""
        return sliding_windows(self.config)

    def local_layer_indices(self) -> list[int]:
        """This pipeline stage's layers (every layer on one stage)."""
        return list(self.model.local_layers)  # type: ignore[arg-type]

    def attention_layers(self) -> list[Attention]:
        """The attention of this stage's layers, in layer order."""
        layers: Any = self.model.layers
        return [layers[i].self_attn.attn for i in self.model.local_layers]  # type: ignore[union-attr]

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Take checkpoint tensors (floats, GGUF blocks or AWQ/GPTQ codes); every
        parameter must be filled exactly once. Linear layers then repack (finalize)."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        linears = {name: m for name, m in modules.items() if isinstance(m, Linear)}
        # Parameters outside Linear layers (norms) are copied here; Linears track theirs.
        missing = {p for p in params if p.rpartition(".")[0] not in linears}
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name.startswith("lm_head.") and self.lm_head is None:
                continue  # tied to the embedding, or on another pipeline stage
            target, shard = name, None
            for ckpt, ours, shard_id in self.stacked_params:
                if f".{ckpt}." in name:
                    target, shard = name.replace(f".{ckpt}.", f".{ours}."), shard_id
                    break
            module_name, _, param_name = target.rpartition(".")
            if module_name in linears:
                linears[module_name].load_shard(param_name, tensor, shard)
                continue
            if target not in params:
                logger.debug("skipping checkpoint tensor %s", name)
                continue
            param = params[target]
            value = as_float_tensor(tensor)
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(
                    f"{name}: checkpoint shape {tuple(value.shape)}, model {tuple(param.shape)}"
                )
            param.data.copy_(value)
            missing.discard(target)
        gaps = sorted(missing) + [
            f"{mname}.{entry}" for mname, m in linears.items() for entry in m.missing()
        ]
        if gaps:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(gaps[:8])}")
        for m in linears.values():
            m.finalize()


def _linear_desc(layer: Linear) -> Any:
    from pagellm.layers import native

    runs = layer.method.native_runs(layer)
    if runs is None or len(runs) > native.MAX_RUNS:
        return None
    desc = native.LinearDesc(len(runs), layer.in_features, layer.out_features)
    for i, run in enumerate(runs):
        d = desc.runs[i]
        d.start, d.end = run.start, run.end
        d.perm = None if run.perm is None else run.perm.data_ptr()
        w = run.weight
        if isinstance(w, torch.Tensor):
            d.weight = w.data_ptr()
            d.wtype = ops.half_weight_type(w.dtype)
            if layer.bias is not None:
                d.bias = layer.bias.data_ptr() + run.start * layer.bias.element_size()
        else:  # a PackedWeight (native_runs excludes the torch layout): it carries the bias
            d.packed = ctypes.addressof(w._desc)  # type: ignore[union-attr]
    return desc


def build_native_stack(model: Any) -> tuple[Any, Any] | None:
    """(library, descriptor) of the whole layer stack for csrc/llama_stack.c, or None when
    some part needs the module path (torch ops, a KV dtype without a native kernel, more
    runs per layer than the descriptor holds)."""
    from pagellm.layers import native
    from pagellm.layers.attention import _NATIVE_KV_TYPES

    layers: list[Any] = list(model.layers)
    rotary: Any = model.rotary
    lib = rotary._lib
    if lib is None or model.norm._lib is None:
        return None
    first = layers[0]
    attn0 = first.self_attn
    cache0: Any = attn0.attn.kv_cache
    if cache0.dtype not in _NATIVE_KV_TYPES or cache0.k.device.type != "cpu":
        return None
    descs = (native.LayerDesc * len(layers))()
    keep: list[Any] = []
    if not all(isinstance(getattr(layer.mlp, "act", None), SiluAndMul) for layer in layers):
        return None  # the stack's MLP is SiLU-gated
    for i, layer in enumerate(layers):
        a, m = layer.self_attn, layer.mlp
        d = descs[i]
        for name, lin in (("qkv", a.qkv_proj), ("o", a.o_proj), ("gate_up", m.gate_up_proj),
                          ("down", m.down_proj)):  # fmt: skip
            ld = _linear_desc(lin)
            if ld is None:
                return None
            setattr(d, name, ld)
        d.input_norm = layer.input_layernorm.weight.data_ptr()
        d.post_norm = layer.post_attention_layernorm.weight.data_ptr()
        if a.q_norm is not None and a.k_norm is not None:
            d.q_norm, d.k_norm = a.q_norm.weight.data_ptr(), a.k_norm.weight.data_ptr()
        cache = a.attn.kv_cache
        d.k_cache, d.v_cache = cache.k.data_ptr(), cache.v.data_ptr()
        if cache.k_scale is not None and cache.v_scale is not None:
            d.k_scale, d.v_scale = cache.k_scale.data_ptr(), cache.v_scale.data_ptr()
        spec = a.attn.spec
        d.window, d.softcap = spec.sliding_window or 0, spec.logit_softcap or 0.0
    eps = layers[0].input_layernorm.eps
    stack = native.StackDesc(
        num_layers=len(layers), hidden=first.input_layernorm.weight.numel(),
        num_heads=attn0.num_heads, num_kv_heads=attn0.num_kv_heads, head_dim=attn0.head_dim,
        rot_dim=rotary.rotary_dim, intermediate=first.mlp.down_proj.in_features,
        block_size=cache0.k.shape[1], eps=eps, attn_scale=attn0.attn.scale,
        kvt=_NATIVE_KV_TYPES[cache0.dtype], cos_sin=rotary.cos_sin_cache.data_ptr(),
        final_norm=model.norm.weight.data_ptr(), layers=descs,
    )  # fmt: skip
    keep.append(descs)
    stack._keep = keep  # type: ignore[attr-defined]  # the layer array lives with it
    return lib, stack
