"""GGUF loading: llama.cpp's q/k permutation, every supported tensor type, config and
tokenizer from metadata, checked against transformers' own GGUF loader."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.layers.quantization.gguf import GGUFRawTensor
from pagellm.models.gguf import unpermute_qk
from tests.utils import prompt_logits, relative_error

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2
# Tensor -> GGUF type, per layer: a mixed-type file like the popular Qwen2.5 Q4 GGUFs
# (a Q5_0 embedding, Q8_0 / Q4_K / Q5_K / Q6_K layers, Q5_0 / Q5_1 in between).
GLOBAL_TYPES = {"token_embd.weight": "Q5_0", "output.weight": "Q6_K"}
LAYER_TYPES = [
    {
        "attn_q.weight": "Q4_0",
        "attn_k.weight": "Q4_1",
        "attn_v.weight": "F16",
        "attn_output.weight": "BF16",
        "ffn_gate.weight": "Q4_K",
        "ffn_up.weight": "Q5_K",
        "ffn_down.weight": "Q6_K",
    },
    {
        "attn_q.weight": "Q8_0",
        "attn_k.weight": "Q5_1",
        "attn_v.weight": "Q5_0",
        "attn_output.weight": "Q4_K",
        "ffn_gate.weight": "Q5_K",
        "ffn_up.weight": "Q8_0",
        "ffn_down.weight": "Q4_0",
    },
]


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
    add("token_embd.weight", (vocab, HIDDEN), GLOBAL_TYPES["token_embd.weight"])
    add("output.weight", (vocab, HIDDEN), GLOBAL_TYPES["output.weight"])
    add("output_norm.weight", (HIDDEN,), "F32")
    for i, types in enumerate(LAYER_TYPES[:LAYERS]):
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,), "F32")
        add(f"blk.{i}.ffn_norm.weight", (HIDDEN,), "F32")
        add(f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN), types["attn_q.weight"], permute_heads=HEADS)
        add(
            f"blk.{i}.attn_k.weight",
            (KV_HEADS * head_dim, HIDDEN),
            types["attn_k.weight"],
            permute_heads=KV_HEADS,
        )
        add(f"blk.{i}.attn_v.weight", (KV_HEADS * head_dim, HIDDEN), types["attn_v.weight"])
        add(f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN), types["attn_output.weight"])
        add(f"blk.{i}.ffn_gate.weight", (INTER, HIDDEN), types["ffn_gate.weight"])
        add(f"blk.{i}.ffn_up.weight", (INTER, HIDDEN), types["ffn_up.weight"])
        add(f"blk.{i}.ffn_down.weight", (HIDDEN, INTER), types["ffn_down.weight"])
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

    llm = LLM(tiny_gguf, kv_cache_memory=16 << 20, dtype="float32", quantization="none")
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


def test_tiny_gguf_runs_its_mixed_types_packed(tiny_gguf: str) -> None:
    """Kept quantized (the default), each merged layer runs one kernel call per run of
    shards that share a format; the result stays within activation-rounding error of the
    dequantized model."""
    ref = LLM(tiny_gguf, kv_cache_memory=16 << 20, dtype="float32", quantization="none")
    llm = LLM(tiny_gguf, kv_cache_memory=16 << 20)
    layers = llm.engine.core.runner.model.model.layers
    qkv0, qkv1 = layers[0].self_attn.qkv_proj, layers[1].self_attn.qkv_proj
    # layer 0: q Q4_0 + k Q4_1 share the u4 kernel, v is F16 (float); layer 1: Q8_0, Q5_1, Q5_0
    assert qkv0.method.describe(qkv0) == "gguf[u4x1,float32]"
    assert qkv1.method.describe(qkv1) == "gguf[s8x1,u8x1,s8x1]"
    emb = llm.engine.core.runner.model.model.embed_tokens
    assert emb.method.describe(emb) == "gguf[s8x1]"  # Q5_0: codes - 16 as int8
    ids = llm.get_tokenizer().encode("GGUF files carry their own tokenizer and chat template.")
    # Activations rounded to int8 per block of 32: about 0.5% of each matmul's output
    # (root mean square), a few percent of the logits nine matmuls deep in this random
    # model; a decoding or packing mistake would be of the order of 100%.
    assert relative_error(prompt_logits(llm, ids), prompt_logits(ref, ids)) < 0.05


def _all_types() -> tuple[list[str], list[str]]:
    """(types gguf-py quantizes and dequantizes, types it only dequantizes)."""
    import gguf
    from gguf import quants

    both, dequant_only = [], []
    w = np.zeros((2, 256), dtype=np.float32)
    for t in gguf.GGMLQuantizationType:
        if t.name == "F32":
            continue
        if t.name in ("F64", "I8", "I16", "I32", "I64"):  # plain numbers: written as they are
            both.append(t.name)
            continue
        block, size = gguf.GGML_QUANT_SIZES[t]
        try:
            quants.dequantize(np.zeros((2, 256 // block * size), dtype=np.uint8), t)
        except NotImplementedError:
            continue
        try:
            quants.quantize(w, t)
            both.append(t.name)
        except NotImplementedError:
            dequant_only.append(t.name)
    return both, dequant_only


QUANTIZABLE, DEQUANT_ONLY = _all_types()
# Largest error of a quantize -> dequantize round trip, as a share of the block's largest
# |weight|. Q8_0 and the affine Q4_1 / Q5_1 round to the nearest of their levels: half a
# step (amax / 127 and (max - min) / 15 or / 31). Q4_0 and Q5_0 map the signed extreme to
# -8 or -16, so the other side stops one step short of it: up to a whole step there
# (amax / 8, amax / 16). The float formats lose their mantissa (F16 2^-11, BF16 2^-8);
# MXFP4 (e2m1 with a shared power-of-two scale) and the ternary TQ types are coarse by design.
ROUND_TRIP_BOUND = {
    "F16": 1e-3, "BF16": 4e-3, "F64": 1e-7, "Q8_0": 1 / 200, "Q5_0": 1 / 15.8, "Q5_1": 1 / 29,
    "Q4_0": 1 / 7.9, "Q4_1": 1 / 14, "MXFP4": 0.26, "TQ1_0": 0.51, "TQ2_0": 0.51,
}  # fmt: skip


def _write_one_tensor(path: str, data: np.ndarray, kind: str, rows: int = 8) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    if data.dtype == np.uint8:
        writer.add_tensor("blk.0.ffn_up.weight", data, raw_dtype=qtype)
    else:
        writer.add_tensor("blk.0.ffn_up.weight", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _load_one_tensor(path: str) -> np.ndarray:
    from pagellm.models.gguf import GGUFFile

    cfg = type("Cfg", (), {"num_attention_heads": 1, "num_key_value_heads": 1})()
    ((name, tensor),) = list(GGUFFile(path).tensors(cfg))
    assert name == "model.layers.0.mlp.up_proj.weight"
    if isinstance(tensor, GGUFRawTensor):  # quantized types come as their blocks
        return tensor.dequantize()
    return tensor.numpy()


def test_every_type_is_known() -> None:
    # The lists come from gguf-py itself; the ones the project promises are in them.
    for kind in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"):
        assert kind in QUANTIZABLE
    for kind in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS"):
        assert kind in DEQUANT_ONLY
    assert set(ROUND_TRIP_BOUND) >= set(QUANTIZABLE) - {"I8", "I16", "I32", "I64"}


@pytest.mark.parametrize("kind", QUANTIZABLE)
def test_round_trip_of_every_quantizable_type(kind: str, tmp_path: Any) -> None:
    """Weights quantized by gguf-py, written to a file and loaded by pagellm come back
    within half a quantization step of the originals."""
    import gguf
    from gguf import quants

    rng = np.random.default_rng(1)
    w = (rng.standard_normal((8, 512)) * 0.05).astype(np.float32)
    w[3, 100] = 0.9  # an outlier: its block's scale must follow it
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    if kind in ("I8", "I16", "I32", "I64"):
        w = np.round(w * 100)
        data = w.astype(getattr(np, kind.lower().replace("i", "int")))
    elif kind == "F64":
        data = w.astype(np.float64)
    else:
        data = quants.quantize(w, qtype)
    path = str(tmp_path / f"{kind}.gguf")
    _write_one_tensor(path, data, kind)
    got = _load_one_tensor(path)
    assert got.shape == w.shape and got.dtype == np.float32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    err = np.abs(got - w).reshape(8, -1, block).max(-1)
    amax = np.abs(w).reshape(8, -1, block).max(-1)
    bound = ROUND_TRIP_BOUND.get(kind, 0.0)
    assert (err <= bound * amax + 1e-7).all(), (kind, float((err / amax).max()))


@pytest.mark.parametrize("kind", DEQUANT_ONLY)
def test_every_dequantize_only_type_loads(kind: str, tmp_path: Any) -> None:
    """Types gguf-py reads but cannot write (K-quants, IQ, NVFP4): random blocks whose
    float16/fp8 scale fields are finite (every byte masked to 0x3B keeps an fp16 exponent
    below 15) load as exactly the values the format defines, in the right shape."""
    import gguf
    from gguf import quants

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 8, 512
    rng = np.random.default_rng(2)
    raw = (rng.integers(0, 256, size=(rows, cols // block * size)) & 0x3B).astype(np.uint8)
    path = str(tmp_path / f"{kind}.gguf")
    _write_one_tensor(path, raw, kind)
    got = _load_one_tensor(path)
    want = quants.dequantize(raw, qtype)
    assert got.shape == (rows, cols) and np.isfinite(got).all()
    np.testing.assert_array_equal(got, want)
    assert np.abs(got).max() > 0


def test_unsupported_tensor_type_is_refused(tmp_path: Any, default_model_path: str) -> None:
    import gguf

    path = str(tmp_path / "bad.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_head_count(1)
    # Q8_K is llama.cpp's activation type: a valid GGUF type that gguf-py cannot dequantize.
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K]
    raw = np.zeros((32, 256 // block * size), dtype=np.uint8)
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q8_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from pagellm.models.gguf import GGUFFile

    cfg = type("Cfg", (), {"num_attention_heads": 1, "num_key_value_heads": 1})()
    ((_, raw),) = list(GGUFFile(path).tensors(cfg))
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight has type Q8_K, which gguf-py"):
        raw.dequantize()


def _same_as_gguf_py(path: str) -> None:
    import gguf

    from pagellm.models.gguf_index import GGUFIndex

    fast, ref = GGUFIndex(path), gguf.GGUFReader(path)
    assert [t.name for t in fast.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(fast.tensors, ref.tensors):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert a.data_offset == b.data_offset and np.array_equal(a.data, b.data), a.name
    assert set(fast.fields) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for key, field in fast.fields.items():
        assert field.contents() == ref.fields[key].contents(), key
        assert len(field.data) == len(ref.fields[key].data), key


def test_fast_header_reader_equals_gguf_py(tiny_gguf: str, default_model_path: str) -> None:
    """The header reader every load uses (models/gguf_index.py) gives what gguf-py's
    reader gives: every tensor's type, shape and bytes, every metadata value."""
    _same_as_gguf_py(tiny_gguf)
    _same_as_gguf_py(default_model_path)


def test_damaged_gguf_files_are_refused(tmp_path: Any, default_model_path: str) -> None:
    from pagellm.models.gguf import GGUFFile

    with open(default_model_path, "rb") as f:
        data = f.read()
    for name, blob in (("cut.gguf", data[:5000]), ("tail.gguf", data[: len(data) // 2]),
                       ("magic.gguf", b"GGUX" + data[4:5000])):  # fmt: skip
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(ValueError, match="cannot read GGUF file"):
            GGUFFile(str(path))
