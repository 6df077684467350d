"""GGUF files: model config and dequantized tensors under Hugging Face names.

llama.cpp's converter permutes the rows of Llama-family q/k projections so that its
RoPE kernel can rotate adjacent channel pairs; pagellm (like transformers) rotates
first-half/second-half pairs, so those rows are permuted back on load:

    GGUF rows per head:  [r0 r(h/2) r1 r(h/2+1) ...]   ->   HF rows: [r0 r1 ... | r(h/2) ...]
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterator
from functools import cached_property
from typing import Any

import numpy as np
import torch

from pagellm.layers.quantization.gguf import PLAIN_TYPES, GGUFRawTensor, dequantize_tensor
from pagellm.models.gguf_index import GGUFIndex

logger = logging.getLogger(__name__)

# Types loaded as float tensors even for matrices (no blocks to keep).
_FLOAT_TYPES = ("F32", "F16", "BF16", *PLAIN_TYPES)

# GGUF architecture -> (HF architecture, transformers config class, q/k rows permuted)
_ARCHS: dict[str, tuple[str, str, bool]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", True),
    "mistral": ("MistralForCausalLM", "MistralConfig", True),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", False),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", False),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", False),
    "qwen3moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", False),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", False),
}
# A "llama" file with experts is Mixtral (llama.cpp writes Mixtral as llama).
_MIXTRAL = ("MixtralForCausalLM", "MixtralConfig", True)
# Stacked expert tensors [experts, rows, cols] -> one matrix per expert.
_EXPERT_NAMES = {
    "ffn_gate_exps.weight": "gate_proj.weight",
    "ffn_up_exps.weight": "up_proj.weight",
    "ffn_down_exps.weight": "down_proj.weight",
}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
}
# Gemma 3 norms around the attention and the MLP (its ffn_norm is the pre-MLP norm).
_GEMMA3_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
# Phi-3 keeps its fused tensors: qkv, and gate + up in ffn_up (split by the model).
_PHI3_NAMES = {
    **_LAYER_NAMES,
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "ffn_up.weight": "mlp.gate_up_proj.weight",
}
_ARCH_NAMES = {"gemma3": _GEMMA3_NAMES, "phi3": _PHI3_NAMES}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = _ARCH_NAMES.get(arch, _LAYER_NAMES)
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}"
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rows (inverse of its permute())."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str) -> GGUFFile:
    """A GGUFFile, parsed once per process (parsing the metadata of a 49k-token
    vocabulary takes gguf-py seconds; config and weights both need it)."""
    return _open_cached(path, os.stat(path).st_mtime_ns)


class GGUFFile:
    def __init__(self, path: str) -> None:
        import gguf

        self.path = path
        self._gguf = gguf
        self.reader: Any
        try:
            # The fast header reader (models/gguf_index.py); gguf-py's for what it can't
            # read (big-endian files), and to name what is wrong with a damaged file.
            self.reader = GGUFIndex(path)
        except Exception:
            try:
                self.reader = gguf.GGUFReader(path)
            except Exception as e:  # a corrupt or non-GGUF file
                raise ValueError(f"cannot read GGUF file {path}: {e}") from e
        self.arch = str(self.value("general.architecture"))
        if self.arch not in _ARCHS:
            raise ValueError(
                f"GGUF architecture {self.arch!r} is not supported; supported: {', '.join(sorted(_ARCHS))}"
            )
        self.num_experts = int(self.value(f"{self.arch}.expert_count", 0) or 0)
        if self.num_experts and self.arch not in ("llama", "qwen3moe"):
            raise ValueError(f"GGUF {self.arch} files with experts are not supported")

    @property
    def _arch_entry(self) -> tuple[str, str, bool]:
        return _MIXTRAL if self.arch == "llama" and self.num_experts else _ARCHS[self.arch]

    def value(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        if hasattr(field, "contents"):
            return field.contents()
        part = field.parts[field.data[0]]  # older gguf-py
        return bytes(part).decode() if part.dtype == np.uint8 else part.tolist()[0]

    @property
    def architecture(self) -> str:
        return self._arch_entry[0]

    @cached_property
    def tensor_names(self) -> set[str]:
        return {t.name for t in self.reader.tensors}

    def hf_config(self) -> Any:
        import transformers

        hf_arch, cls_name, _ = self._arch_entry
        a = self.arch
        n_heads = int(self.value(f"{a}.attention.head_count"))
        hidden = int(self.value(f"{a}.embedding_length"))
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        # Count the vocabulary without decoding 50k strings (field.data indexes its items).
        vocab = int(self.value(f"{a}.vocab_size", len(tokens.data) if tokens is not None else 0))
        kw: dict[str, Any] = dict(
            architectures=[hf_arch],
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(self.value(f"{a}.feed_forward_length")),
            num_hidden_layers=int(self.value(f"{a}.block_count")),
            num_attention_heads=n_heads,
            num_key_value_heads=int(self.value(f"{a}.attention.head_count_kv", n_heads)),
            max_position_embeddings=int(self.value(f"{a}.context_length", 2048)),
            rms_norm_eps=float(self.value(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self.value(f"{a}.rope.freq_base", 10000.0)),
            tie_word_embeddings="output.weight" not in self.tensor_names,
            head_dim=int(self.value(f"{a}.attention.key_length", hidden // n_heads)),
            bos_token_id=self.value("tokenizer.ggml.bos_token_id"),
            eos_token_id=self.value("tokenizer.ggml.eos_token_id"),
            attention_bias=any(".attn_q.bias" in n for n in self.tensor_names) and a != "qwen2",
        )
        scaling_type = self.value(f"{a}.rope.scaling.type")
        if scaling_type == "linear":
            kw["rope_scaling"] = {
                "rope_type": "linear",
                "factor": float(self.value(f"{a}.rope.scaling.factor")),
            }
        elif scaling_type not in (None, "none"):
            raise ValueError(f"GGUF rope scaling {scaling_type!r} is not supported")
        if a == "mistral":
            # transformers' MistralConfig defaults to a 4096 window; a GGUF says its own.
            window = self.value(f"{a}.attention.sliding_window")
            kw["sliding_window"] = int(window) if window else None
        if self.num_experts:
            kw["num_experts_per_tok"] = int(self.value(f"{a}.expert_used_count"))
            if a == "qwen3moe":
                kw["num_experts"] = self.num_experts
                kw["moe_intermediate_size"] = int(self.value(f"{a}.expert_feed_forward_length"))
                kw["norm_topk_prob"] = True  # llama.cpp normalizes Qwen3-MoE's top-k weights
                kw["mlp_only_layers"] = []
            else:
                kw["num_local_experts"] = self.num_experts
        if a == "gemma3":
            self._gemma3_config(kw)
        if a == "phi3":
            self._phi3_config(kw)
        cfg = getattr(transformers, cls_name)(**kw)
        if a == "gemma3":
            cfg.pagellm_gguf_norms = True  # llama.cpp stored the norms as 1 + weight
        if "rope_freqs.weight" in self.tensor_names:
            # Llama 3.1-style long-context models store per-frequency divisors.
            cfg.pagellm_rope_freq_factors = self._float_list("rope_freqs.weight")
        return cfg

    def _expert_tensors(
        self, t: Any, layer: str, what: str
    ) -> Iterator[tuple[str, torch.Tensor | GGUFRawTensor]]:
        """A stacked [experts, rows, cols] tensor as one matrix per expert (quantized ones
        keep their blocks)."""
        qtype = t.tensor_type.name
        rows, cols = int(t.shape[1]), int(t.shape[0])
        data = np.asarray(t.data)
        for e in range(self.num_experts):
            name = f"model.layers.{layer}.mlp.experts.{e}.{what}"
            if qtype not in _FLOAT_TYPES:
                raw = np.ascontiguousarray(data.reshape(self.num_experts, rows, -1)[e])
                yield name, GGUFRawTensor(f"{t.name}[{e}]", qtype, raw, (rows, cols))
            else:
                arr = dequantize_tensor(
                    t.name, data.reshape(self.num_experts, rows, -1)[e], t.tensor_type
                )
                yield name, torch.from_numpy(np.array(arr.reshape(rows, cols), copy=True))

    def _float_list(self, tensor_name: str) -> list[float]:
        t = next(t for t in self.reader.tensors if t.name == tensor_name)
        return [float(x) for x in np.asarray(t.data).reshape(-1)]

    def _phi3_config(self, kw: dict[str, Any]) -> None:
        """Phi-3 as llama.cpp's converter writes it: the window (0: none), the original
        context length, and LongRoPE's factors as two small tensors (with the attention
        factor it computed from the two lengths)."""
        a = "phi3"
        window = self.value(f"{a}.attention.sliding_window")
        kw["sliding_window"] = int(window) if window else None
        orig = self.value(f"{a}.rope.scaling.original_context_length")
        kw["original_max_position_embeddings"] = int(orig or kw["max_position_embeddings"])
        rot = self.value(f"{a}.rope.dimension_count")
        if rot and int(rot) != kw["head_dim"]:
            kw["partial_rotary_factor"] = int(rot) / kw["head_dim"]
        kw.pop("attention_bias", None)
        if "rope_factors_long.weight" in self.tensor_names:
            params: dict[str, Any] = {
                "rope_type": "longrope",
                "rope_theta": kw.pop("rope_theta"),
                "long_factor": self._float_list("rope_factors_long.weight"),
                "short_factor": self._float_list("rope_factors_short.weight"),
            }
            attn = self.value(f"{a}.rope.scaling.attn_factor")
            if attn:
                params["attention_factor"] = float(attn)
            kw["rope_parameters"] = params

    def _gemma3_config(self, kw: dict[str, Any]) -> None:
        """Gemma 3's fields as llama.cpp writes (or implies) them: a global layer every
        sixth, local layers with RoPE base 10000, the window, the attention scale (the
        27B model scales by hidden / heads, the others by the head size)."""
        a = "gemma3"
        n = kw["num_hidden_layers"]
        pattern = int(self.value(f"{a}.attention.sliding_window_pattern", 6) or 6)
        kw["layer_types"] = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)
        ]
        kw["sliding_window"] = int(self.value(f"{a}.attention.sliding_window", 4096))
        kw["query_pre_attn_scalar"] = (
            kw["hidden_size"] // kw["num_attention_heads"] if n == 62 else kw["head_dim"]
        )
        kw["hidden_activation"] = "gelu_pytorch_tanh"
        cap = self.value(f"{a}.final_logit_softcapping")
        kw["final_logit_softcapping"] = float(cap) if cap else None
        full: dict[str, Any] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
        scaling = kw.pop("rope_scaling", None)
        if scaling:
            full.update(scaling)
        kw["rope_parameters"] = {
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
        kw.pop("attention_bias", None)

    def tensors(self, cfg: Any) -> Iterator[tuple[str, torch.Tensor | GGUFRawTensor]]:
        """(Hugging Face name, tensor) for every weight: matrices of a quantized type as
        their raw blocks (``GGUFRawTensor``, rows in Hugging Face order), everything
        else as a float32 tensor. Each layer's quantization method decides what to keep."""
        permute = self._arch_entry[2]
        n_heads = cfg.num_attention_heads
        n_kv = cfg.num_key_value_heads
        for t in self.reader.tensors:
            experts = _BLOCK_RE.match(t.name)
            if experts and experts.group(2) in _EXPERT_NAMES:
                yield from self._expert_tensors(
                    t, experts.group(1), _EXPERT_NAMES[experts.group(2)]
                )
                continue
            name = hf_tensor_name(t.name, self.arch)
            if name is None:
                if not t.name.startswith(("rope_freqs.", "rope_factors_")):
                    logger.debug("ignoring GGUF tensor %s", t.name)
                continue
            qtype = t.tensor_type.name
            if len(t.shape) == 2 and qtype not in _FLOAT_TYPES:
                raw = np.asarray(t.data)
                if permute and name.endswith("q_proj.weight"):
                    raw = unpermute_qk(raw, n_heads)
                elif permute and name.endswith("k_proj.weight"):
                    raw = unpermute_qk(raw, n_kv)
                shape = (int(t.shape[1]), int(t.shape[0]))
                yield name, GGUFRawTensor(t.name, qtype, np.ascontiguousarray(raw), shape)
                continue
            arr = dequantize_tensor(t.name, t.data, t.tensor_type)
            if permute and name.endswith("q_proj.weight"):
                arr = unpermute_qk(arr, n_heads)
            elif permute and name.endswith("k_proj.weight"):
                arr = unpermute_qk(arr, n_kv)
            elif permute and name.endswith(("q_proj.bias", "k_proj.bias")):
                heads = n_heads if "q_proj" in name else n_kv
                arr = unpermute_qk(arr.reshape(-1, 1), heads).reshape(-1)
            if not arr.flags.writeable or not arr.flags.c_contiguous:
                arr = np.array(arr, copy=True, order="C")  # F32 tensors are read-only file maps
            yield name, torch.from_numpy(arr)
