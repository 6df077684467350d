"""Reading a PEFT LoRA adapter directory, checked against the base model.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the older
``adapter_model.bin``) with, per targeted projection of layer i,

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]

and the update is ``ΔW = scale · B A`` with scale ``lora_alpha / r`` (``lora_alpha / √r``
with ``use_rslora``), per module where ``rank_pattern`` / ``alpha_pattern`` say so.
Everything is checked before anything is kept: a missing path, a rank over the limit,
a module the model does not have, shapes that do not fit, or a PEFT feature pagellm does
not run (DoRA, trained biases, modules_to_save) raises ValueError naming it.
``check_adapter`` does that from the safetensors header alone (the front end, per
request); ``load_adapter`` does it and reads the weights (the engine process).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

# PEFT's module name -> (our merged Linear, its shard or None).
TARGETS: dict[str, tuple[str, str | None]] = {
    "q_proj": ("self_attn.qkv_proj", "q"),
    "k_proj": ("self_attn.qkv_proj", "k"),
    "v_proj": ("self_attn.qkv_proj", "v"),
    "o_proj": ("self_attn.o_proj", None),
    "gate_proj": ("mlp.gate_up_proj", "gate"),
    "up_proj": ("mlp.gate_up_proj", "up"),
    "down_proj": ("mlp.down_proj", None),
}

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$"
)


@dataclass
class LoRAAdapter:
    """An adapter's weights: (layer, PEFT module) -> (A [r, in], B·scale [out, r])."""

    path: str
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted({m for _, m in self.weights})

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b in self.weights.values())  # fmt: skip


def module_shapes(hf_config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) features of each targetable projection of the base model."""
    from pagellm.models.llama import head_dim_of

    hidden = int(hf_config.hidden_size)
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    d = head_dim_of(hf_config)
    inter = int(hf_config.intermediate_size)
    return {
        "q_proj": (hidden, heads * d),
        "k_proj": (hidden, kv_heads * d),
        "v_proj": (hidden, kv_heads * d),
        "o_proj": (heads * d, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern: a key matches a module path ending in it."""
    for key, value in (patterns or {}).items():
        if module_path == key or re.fullmatch(rf"(.*\.)?{key}", module_path):
            return value
    return default


def read_config(path: str) -> dict[str, Any]:
    if not isinstance(path, str) or not path:
        raise ValueError("a LoRA adapter needs a path")
    if not os.path.isdir(path):
        raise ValueError(f"LoRA adapter path {path!r} is not a directory")
    cfg_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"LoRA adapter {path!r} has no adapter_config.json")
    try:
        with open(cfg_file) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"LoRA adapter {path!r}: adapter_config.json is unreadable: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"LoRA adapter {path!r}: adapter_config.json is not an object")
    return cfg


def _check_config(cfg: dict[str, Any], path: str, max_rank: int) -> None:
    def fail(msg: str) -> None:
        raise ValueError(f"LoRA adapter {path!r}: {msg}")

    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        fail(f"peft_type {peft_type} is not supported (only LORA)")
    if cfg.get("use_dora"):
        fail("DoRA adapters (use_dora) are not supported")
    if cfg.get("bias", "none") not in ("none", None):
        fail(f"trained biases (bias={cfg.get('bias')!r}) are not supported")
    if cfg.get("modules_to_save"):
        fail(f"modules_to_save {cfg['modules_to_save']} is not supported (only LoRA projections)")
    if cfg.get("fan_in_fan_out"):
        fail("fan_in_fan_out weights (Conv1D models) are not supported")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted({str(t).rpartition(".")[2] for t in targets} - set(TARGETS))
        if unknown:
            fail(f"unknown target modules {unknown}; supported: {', '.join(TARGETS)}")
    ranks = [cfg.get("r", 8), *(cfg.get("rank_pattern") or {}).values()]
    for r in ranks:
        if not isinstance(r, int) or r < 1:
            fail(f"rank {r!r} is not a positive integer")
        if r > max_rank:
            fail(f"rank {r} is over max_lora_rank {max_rank}")


def _adapter_file(path: str) -> str:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            return f
    raise ValueError(
        f"LoRA adapter {path!r} has no adapter_model.safetensors (or adapter_model.bin)"
    )


def _read_shapes(path: str) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.Tensor] | None]:
    """The adapter's tensor names and shapes: from the safetensors header alone (no tensor
    is read), or from the loaded tensors of a legacy .bin (returned for reuse)."""
    f = _adapter_file(path)
    try:
        if f.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(f, framework="pt") as st:
                return {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}, None  # noqa: SIM118
        tensors = dict(torch.load(f, map_location="cpu", weights_only=True))
    except Exception as e:
        raise ValueError(f"LoRA adapter {path!r}: cannot read {f}: {e}") from e
    return {k: tuple(v.shape) for k, v in tensors.items()}, tensors


def check_adapter(
    path: str, hf_config: Any, max_rank: int
) -> dict[tuple[int, str], tuple[str, str, float]]:
    """Check a PEFT adapter against the model without reading its weights (safetensors):
    (layer, PEFT module) -> (key of A, key of B, scale). ValueError names what is wrong."""
    plan, _ = _plan(path, hf_config, max_rank)
    return plan


def _plan(
    path: str, hf_config: Any, max_rank: int
) -> tuple[dict[tuple[int, str], tuple[str, str, float]], dict[str, torch.Tensor] | None]:
    cfg = read_config(path)
    _check_config(cfg, path, max_rank)
    shapes, tensors = _read_shapes(path)
    fans = module_shapes(hf_config)
    num_layers = int(hf_config.num_hidden_layers)
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key in shapes:
        m = _KEY.match(key)
        if m is None:
            raise ValueError(
                f"LoRA adapter {path!r}: tensor {key} is not a LoRA weight of a supported "
                f"projection ({', '.join(TARGETS)})"
            )
        layer, module, which = int(m.group(1)), m.group(3), m.group(4)
        if module not in TARGETS:
            raise ValueError(
                f"LoRA adapter {path!r}: unknown target module {module!r} in {key}; "
                f"supported: {', '.join(TARGETS)}"
            )
        if layer >= num_layers:
            raise ValueError(
                f"LoRA adapter {path!r}: {key} names layer {layer} but the model has {num_layers}"
            )
        pairs.setdefault((layer, module), {})[which] = key
    if not pairs:
        raise ValueError(f"LoRA adapter {path!r} holds no LoRA weights")
    use_rslora = bool(cfg.get("use_rslora", False))
    default_r, default_alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    plan: dict[tuple[int, str], tuple[str, str, float]] = {}
    for (layer, module), ab in sorted(pairs.items()):
        where = f"layers.{layer}.{module}"
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {path!r}: {where} lacks lora_{'AB'[('A' in ab)]}")
        a, b = shapes[ab["A"]], shapes[ab["B"]]
        fan_in, fan_out = fans[module]
        r = a[0] if a else 0
        if a != (r, fan_in) or b != (fan_out, r):
            raise ValueError(
                f"LoRA adapter {path!r}: {where} has A {a} and B {b}, "
                f"expected A (r, {fan_in}) and B ({fan_out}, r) for this model"
            )
        if r > max_rank:
            raise ValueError(
                f"LoRA adapter {path!r}: {where} has rank {r}, over max_lora_rank {max_rank}"
            )
        module_path = f"model.layers.{layer}.{TARGETS[module][0].split('.')[0]}.{module}"
        r_cfg = _pattern_value(cfg.get("rank_pattern") or {}, module_path, default_r)
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module_path, default_alpha))
        scale = alpha / math.sqrt(r_cfg) if use_rslora else alpha / r_cfg
        plan[(layer, module)] = (ab["A"], ab["B"], scale)
    return plan, tensors


def load_adapter(
    path: str,
    hf_config: Any,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LoRAAdapter:
    """Check and read a PEFT adapter; B is pre-multiplied by its scale."""
    plan, tensors = _plan(path, hf_config, max_rank)
    if tensors is None:
        from safetensors.torch import load_file

        f = _adapter_file(path)
        try:
            tensors = load_file(f)
        except Exception as e:
            raise ValueError(f"LoRA adapter {path!r}: cannot read {f}: {e}") from e
    adapter = LoRAAdapter(path=path, rank=0)
    for where, (key_a, key_b, scale) in plan.items():
        a, b = tensors[key_a], tensors[key_b]
        adapter.rank = max(adapter.rank, a.shape[0])
        adapter.weights[where] = (
            a.to(device=device, dtype=dtype).contiguous(),
            (b.float() * scale).to(device=device, dtype=dtype).contiguous(),
        )
    return adapter
