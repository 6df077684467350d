"""GGUF loading: llama.cpp's q/k permutation, every supported tensor type, config and
tokenizer from metadata, checked against transformers' own GGUF loader."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.models.gguf import unpermute_qk

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2
# Tensor -> GGUF type: every supported type appears at least once.
TYPES = {
    "token_embd.weight": "Q8_0",
    "output.weight": "Q6_K",
    "attn_q.weight": "Q4_0",
    "attn_k.weight": "Q4_1",
    "attn_v.weight": "F16",
    "attn_output.weight": "BF16",
    "ffn_gate.weight": "Q4_K",
    "ffn_up.weight": "Q5_K",
    "ffn_down.weight": "Q6_K",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (LlamaModel.permute)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.arange(12 * 8 * 3, dtype=np.float32).reshape(12 * 8, 3)
    for heads in (1, 3, 12):
        np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, heads), heads), w)


def _k_quant_bytes(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks with sane fp16 scales (gguf-py cannot quantize K types)."""
    size, layout = {"Q4_K": (144, [(0, 4)]), "Q5_K": (176, [(0, 4)]), "Q6_K": (210, [(208, 2)])}[
        qtype
    ]
    blocks = rows * cols // 256
    raw = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
    for off, n in layout:
        scales = np.full(n // 2, 0.002, dtype=np.float16).view(np.uint8)
        raw[:, off : off + n] = scales
    return raw.reshape(rows, cols // 256 * size)


def write_tiny_gguf(path: str, source_gguf: str) -> None:
    import gguf
    from gguf import quants

    reader = gguf.GGUFReader(source_gguf)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        vtype = gguf.GGUFValueType(field.types[0])
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, vtype)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    rng = np.random.default_rng(0)

    def add(name: str, shape: tuple[int, ...], kind: str, permute_heads: int = 0) -> None:
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        if kind in ("Q4_K", "Q5_K", "Q6_K"):
            writer.add_tensor(name, _k_quant_bytes(*shape, kind, rng), raw_dtype=qtype)
            return
        w = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if len(shape) == 1:
            w = (1.0 + w).astype(np.float32)
        if permute_heads:
            w = llama_cpp_permute(w, permute_heads)
        if kind == "F32":
            writer.add_tensor(name, w)
        else:
            writer.add_tensor(name, quants.quantize(w, qtype), raw_dtype=qtype)

    head_dim = HIDDEN // HEADS
    add("token_embd.weight", (vocab, HIDDEN), TYPES["token_embd.weight"])
    add("output.weight", (vocab, HIDDEN), TYPES["output.weight"])
    add("output_norm.weight", (HIDDEN,), "F32")
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,), "F32")
        add(f"blk.{i}.ffn_norm.weight", (HIDDEN,), "F32")
        add(f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN), TYPES["attn_q.weight"], permute_heads=HEADS)
        add(
            f"blk.{i}.attn_k.weight",
            (KV_HEADS * head_dim, HIDDEN),
            TYPES["attn_k.weight"],
            permute_heads=KV_HEADS,
        )
        add(f"blk.{i}.attn_v.weight", (KV_HEADS * head_dim, HIDDEN), TYPES["attn_v.weight"])
        add(f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN), TYPES["attn_output.weight"])
        add(f"blk.{i}.ffn_gate.weight", (INTER, HIDDEN), TYPES["ffn_gate.weight"])
        add(f"blk.{i}.ffn_up.weight", (INTER, HIDDEN), TYPES["ffn_up.weight"])
        add(f"blk.{i}.ffn_down.weight", (HIDDEN, INTER), TYPES["ffn_down.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, default_model_path: str) -> str:
    path = str(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
    write_tiny_gguf(path, default_model_path)
    return path


def test_tiny_gguf_with_every_type_matches_transformers(tiny_gguf: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = LLM(tiny_gguf, kv_cache_memory=16 << 20)
    cfg = llm.engine.config.model.hf_config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        HIDDEN,
        HEADS,
        KV_HEADS,
    )
    assert cfg.tie_word_embeddings is False and llm.engine.config.model.max_model_len == 512
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(tiny_gguf), gguf_file=os.path.basename(tiny_gguf), dtype=torch.float32
    ).eval()
    hf_tok = AutoTokenizer.from_pretrained(
        os.path.dirname(tiny_gguf), gguf_file=os.path.basename(tiny_gguf)
    )
    text = "GGUF files carry their own tokenizer and chat template."
    out = llm.generate(
        text,
        SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=3, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert out.prompt_token_ids == hf_tok.encode(text)
    ids = out.prompt_token_ids + list(out.outputs[0].token_ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    n = len(out.prompt_token_ids)
    assert out.outputs[0].token_ids == ref[n - 1 : len(ids) - 1].argmax(-1).tolist()
    assert out.prompt_logprobs is not None
    for pos in range(1, n):
        entry = out.prompt_logprobs[pos]
        assert entry is not None
        for tok, lp in entry.items():
            assert abs(lp.logprob - ref[pos - 1, tok].item()) < 1e-3
    # The chat template comes from the GGUF metadata.
    assert "<|im_start|>" in llm.get_tokenizer().chat_template


def test_unsupported_tensor_type_is_refused(tmp_path: Any, default_model_path: str) -> None:
    import gguf

    path = str(tmp_path / "bad.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_head_count(1)
    w = np.zeros((32, 32), dtype=np.float32)
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q5_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q5_0)  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from pagellm.models.gguf import GGUFFile

    cfg = type("Cfg", (), {"num_attention_heads": 1, "num_key_value_heads": 1})()
    with pytest.raises(ValueError, match="type Q5_0; supported: F32"):
        list(GGUFFile(path).tensors(cfg))
