"""Gemma 3, Phi-3, Qwen3-MoE and Mixtral (and Mistral's sliding window) against
transformers on tiny random models (fp32), with per-layer attention kinds: prompts
longer than the sliding window, chunked prefill, prefix-cache hits across the window
boundary, blocks freed behind the window; and embeddings against transformers' pooled
hidden states."""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.sampling_params import PoolingParams
from tests.conftest import hf_logits, save_random_model
from tests.utils import prompt_logits

TOL = 2e-4
WINDOW = 12
FAMILIES = ["Gemma3ForCausalLM", "Phi3ForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM",
            "MistralForCausalLM"]  # fmt: skip


def family_config(arch: str) -> Any:
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        architectures=[arch],
    )  # fmt: skip
    if arch == "Gemma3ForCausalLM":
        return transformers.Gemma3TextConfig(
            **common, head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            final_logit_softcapping=15.0,
        )  # fmt: skip
    if arch == "Phi3ForCausalLM":
        rot = 32 // 2
        return transformers.Phi3Config(
            **common, sliding_window=WINDOW, original_max_position_embeddings=128,
            rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(rot)],
                          "long_factor": [1.5 + 0.1 * i for i in range(rot)]},
        )  # fmt: skip
    if arch == "Qwen3MoeForCausalLM":
        return transformers.Qwen3MoeConfig(
            **common, head_dim=32, moe_intermediate_size=64, num_experts=4,
            num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
        )  # fmt: skip
    if arch == "MixtralForCausalLM":
        return transformers.MixtralConfig(
            **common, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW
        )
    if arch == "MistralForCausalLM":
        return transformers.MistralConfig(**common, sliding_window=WINDOW)
    raise AssertionError(arch)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer: Any) -> dict[str, str]:
    # Gemma stores its norms as 1 + w: weights around 0 are the usual ones.
    return {
        arch: save_random_model(
            tmp_path_factory,
            smol_tokenizer,
            arch,
            family_config(arch),
            norm_mean=0.0 if arch.startswith("Gemma") else 1.0,
        )
        for arch in FAMILIES
    }


def _hf(path: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(n)]


@pytest.mark.parametrize("arch", FAMILIES)
def test_prompt_logits_equal_hf(arch: str, family_dirs: dict[str, str]) -> None:
    """Every prompt position, for a prompt 5x the window (Phi-3: under its LongRoPE
    original length, where transformers uses the short factors)."""
    path = family_dirs[arch]
    llm = LLM(path, dtype="float32", block_size=4, kv_cache_memory=8 << 20)
    prompt = _prompt(5 * WINDOW, 1)
    torch.testing.assert_close(
        prompt_logits(llm, prompt), hf_logits(_hf(path), prompt), atol=TOL, rtol=TOL
    )


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_chunked_batched_decode_and_prefix_hits_equal_hf(
    arch: str, backend: str, family_dirs: dict[str, str]
) -> None:
    """A mixed batch, prefilled in chunks of 8 tokens while others decode, greedy tokens
    and logprobs against transformers on the full sequence; then the same prompts again,
    served from the prefix cache across the window boundary, give the same output."""
    path = family_dirs[arch]
    llm = LLM(
        path, dtype="float32", block_size=4, kv_cache_memory=8 << 20, max_num_batched_tokens=8,
        attention_backend=backend, native_kernels=backend == "auto",
    )  # fmt: skip
    prompts = [_prompt(n, 10 + n) for n in (3 * WINDOW + 5, 7, 2 * WINDOW)]
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=3, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    hf = _hf(path)
    for prompt, out in zip(prompts, outs):
        gen = out.outputs[0].token_ids
        ref = hf_logits(hf, prompt + gen).log_softmax(-1)
        assert gen == ref[len(prompt) - 1 : -1].argmax(-1).tolist()
        for i, lp in enumerate(out.outputs[0].logprobs or []):
            for tok, val in lp.items():
                assert abs(val.logprob - ref[len(prompt) - 1 + i, tok].item()) < TOL
    again = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]
    assert again[0].num_cached_tokens >= 2 * WINDOW


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Gemma3ForCausalLM"])
def test_blocks_behind_the_window_are_freed(arch: str, family_dirs: dict[str, str]) -> None:
    """A long generation holds a bounded number of each sliding layer's blocks: Mixtral
    (every layer slides: one KV cache group) and Gemma 3 (local, global, local: a group
    per layer, the global one keeping the whole length)."""
    path = family_dirs[arch]
    llm = LLM(path, dtype="float32", block_size=4, kv_cache_memory=8 << 20)
    engine = llm.engine
    engine.add_request("long", {"prompt_token_ids": _prompt(20, 3)},
                       SamplingParams(max_tokens=150, temperature=0, ignore_eos=True))  # fmt: skip
    scheduler = engine.core.scheduler
    windows = engine.plan.layout.windows
    assert windows == ((WINDOW,) if arch == "MixtralForCausalLM" else (None, WINDOW, WINDOW))
    # A block is a page over the slots: all 3 layers (Mixtral), one per group (Gemma 3).
    slots = 3 if arch == "MixtralForCausalLM" else 1
    hd = 32
    assert engine.plan.kv_bytes_per_token == slots * 2 * 2 * hd * 4
    most = [0] * len(windows)
    while engine.has_unfinished_requests():
        engine.step()
        for g, held in enumerate(scheduler.kv.req_to_blocks.get("long", ())):
            most[g] = max(most[g], sum(1 for b in held if b.ref_cnt > 0))
        scheduler.check_invariants()
    for window, n in zip(windows, most):
        if window is None:
            assert n >= (20 + 150) // 4
        else:
            assert n <= WINDOW // 4 + 3, most
    assert scheduler.kv.pool.num_free_blocks == scheduler.kv.pool.num_blocks


def _hf_pooled(path: str, prompt: list[int], how: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0]
    vec = hidden[-1] if how == "last" else hidden.mean(dim=0)
    return torch.nn.functional.normalize(vec, dim=0)


@pytest.mark.parametrize("how", ["last", "mean"])
def test_embeddings_equal_hf_pooling(how: str, tiny_model_dirs: dict[str, str]) -> None:
    path = tiny_model_dirs["Qwen3ForCausalLM"]
    llm = LLM(path, dtype="float32", block_size=4, kv_cache_memory=8 << 20,
              max_num_batched_tokens=16, pooling=how)  # fmt: skip
    prompts = [_prompt(n, n) for n in (40, 3, 17)]
    outs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    for p, out in zip(prompts, outs):
        ref = _hf_pooled(path, p, how)
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), ref, atol=1e-4, rtol=1e-4)
    # Matryoshka-style truncation: the first d values, renormalized.
    cut = llm.embed({"prompt_token_ids": prompts[0]}, PoolingParams(dimensions=16), use_tqdm=False)
    ref = torch.nn.functional.normalize(_hf_pooled(path, prompts[0], how)[:16], dim=0)
    torch.testing.assert_close(torch.tensor(cut[0].outputs.embedding), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="dimensions"):
        llm.embed("hi", PoolingParams(dimensions=10_000))
    # Embeddings and generation share the engine.
    mixed = llm.generate([prompts[1]], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(mixed[0].outputs[0].token_ids) == 3


def test_embeddings_endpoint(server: Any, smol_llm_default: LLM) -> None:
    import openai

    from tests.conftest import API_KEY

    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY)
    model = client.models.list().data[0].id
    texts = ["The cat sat on the mat.", "Paged attention keeps KV in blocks."]
    r = client.embeddings.create(model=model, input=texts)
    assert [d.index for d in r.data] == [0, 1]
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0
    ref = smol_llm_default.embed(texts, use_tqdm=False)
    for d, o in zip(r.data, ref):
        assert np.allclose(d.embedding, o.outputs.embedding, atol=1e-5)
        assert abs(np.linalg.norm(d.embedding) - 1) < 1e-5
    b64 = client.embeddings.create(model=model, input=texts[0], encoding_format="base64",
                                   dimensions=64)  # fmt: skip
    vec = b64.data[0].embedding
    if isinstance(vec, str):  # older clients hand back the text
        vec = np.frombuffer(base64.b64decode(vec), dtype="<f4").tolist()
    assert len(vec) == 64 and abs(np.linalg.norm(vec) - 1) < 1e-5
    import httpx

    http = httpx.Client(base_url=server.url(), headers={"Authorization": f"Bearer {API_KEY}"})
    for body, field in (({"input": []}, "input"), ({"input": "x", "dimensions": 0}, "dimensions"),
                        ({"input": "x", "model": "nope"}, None)):  # fmt: skip
        resp = http.post("/v1/embeddings", json=body)
        assert resp.status_code in (400, 404), resp.text
        if field:
            assert field in resp.json()["error"]["message"]


def _gguf_writer(path: str, arch: str, cfg: Any, rope_base: float) -> Any:
    """A GGUFWriter with the hyperparameters every architecture shares, and the vocabulary
    size (no tokenizer: the tests pass an HF directory's, which loads faster)."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(rope_base)
    w.add_vocab_size(cfg.vocab_size)
    return w


def _write_gemma3_gguf(hf_dir: str, path: str) -> None:
    """The tiny Gemma 3 as llama.cpp's converter writes it: F32 tensors under GGUF names,
    norms stored as 1 + weight (no tokenizer: tests pass the HF directory's)."""
    from safetensors.torch import load_file

    cfg = family_config("Gemma3ForCausalLM")
    tensors = load_file(f"{hf_dir}/model.safetensors")
    w = _gguf_writer(path, "gemma3", cfg, 1_000_000.0)
    w.add_sliding_window(WINDOW)
    w.add_uint32("gemma3.attention.sliding_window_pattern", 2)  # layers 0, 2 local; 1 global
    w.add_float32("gemma3.final_logit_softcapping", cfg.final_logit_softcapping)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}  # fmt: skip
    for name, t in tensors.items():
        arr = t.float().numpy()
        if "norm" in name:
            arr = arr + 1.0
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            out = f"blk.{layer}.{names[rest.removesuffix('.weight')]}.weight"
        w.add_tensor(out, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gemma3_from_gguf_equals_hf(family_dirs: dict[str, str], tmp_path: Any) -> None:
    """Gemma 3 from a GGUF file: its local/global layout (the window pattern), the
    norms llama.cpp stores as 1 + weight and the soft-cap read from the metadata."""
    hf_dir = family_dirs["Gemma3ForCausalLM"]
    path = str(tmp_path / "gemma3.gguf")
    _write_gemma3_gguf(hf_dir, path)
    llm = LLM(path, tokenizer=hf_dir, dtype="float32", block_size=4, kv_cache_memory=8 << 20)
    cfg = llm.engine.config.model.hf_config
    assert cfg.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    prompt = _prompt(4 * WINDOW, 5)
    from transformers import AutoModelForCausalLM

    # llama.cpp keeps no query_pre_attn_scalar: it scales by the head size (27B: hidden /
    # heads), so the reference does too.
    hf = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager", query_pre_attn_scalar=32
    ).eval()
    torch.testing.assert_close(
        prompt_logits(llm, prompt), hf_logits(hf, prompt), atol=TOL, rtol=TOL
    )


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "MixtralForCausalLM"])
def test_moe_from_gguf_equals_hf(arch: str, tmp_path: Any, family_dirs: dict[str, str]) -> None:
    """MoE GGUF files as llama.cpp writes them: experts stacked in 3-D ``*_exps`` tensors
    (qwen3moe; Mixtral as a "llama" file with an expert count and permuted q/k rows)."""
    from transformers import AutoModelForCausalLM

    cfg = family_config(arch)
    if arch == "Qwen3MoeForCausalLM":
        cfg.mlp_only_layers = []  # llama.cpp's qwen3moe has experts in every layer
    cfg.sliding_window = None
    torch.manual_seed(1)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    sd = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    a = "qwen3moe" if arch == "Qwen3MoeForCausalLM" else "llama"
    path = str(tmp_path / "moe.gguf")
    w = _gguf_writer(path, a, cfg, float(cfg.rope_parameters["rope_theta"]))
    w.add_expert_count(getattr(cfg, "num_experts", None) or cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if a == "qwen3moe":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)

    def add(name: str, arr: np.ndarray) -> None:
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output.weight", sd["lm_head.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if a == "llama":
            q = _llama_cpp_permute(q, cfg.num_attention_heads)
            k = _llama_cpp_permute(k, cfg.num_key_value_heads)
        for gname, arr in (("attn_q", q), ("attn_k", k), ("attn_v", sd[p + "self_attn.v_proj.weight"]),
                           ("attn_output", sd[p + "self_attn.o_proj.weight"]),
                           ("attn_norm", sd[p + "input_layernorm.weight"]),
                           ("ffn_norm", sd[p + "post_attention_layernorm.weight"]),
                           ("ffn_gate_inp", sd[p + "mlp.gate.weight"])):  # fmt: skip
            add(f"blk.{i}.{gname}.weight", arr)
        if a == "qwen3moe":
            add(f"blk.{i}.attn_q_norm.weight", sd[p + "self_attn.q_norm.weight"])
            add(f"blk.{i}.attn_k_norm.weight", sd[p + "self_attn.k_norm.weight"])
        # transformers 5 holds experts stacked: gate_up [E, 2I, H] (gate first), down [E, H, I].
        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        inter = gate_up.shape[1] // 2
        add(f"blk.{i}.ffn_gate_exps.weight", gate_up[:, :inter])
        add(f"blk.{i}.ffn_up_exps.weight", gate_up[:, inter:])
        add(f"blk.{i}.ffn_down_exps.weight", down)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = family_dirs["MistralForCausalLM"]
    llm = LLM(path, tokenizer=tok, dtype="float32", block_size=4, kv_cache_memory=8 << 20)
    assert llm.engine.config.model.architecture == arch
    prompt = _prompt(30, 9)
    torch.testing.assert_close(
        prompt_logits(llm, prompt), hf_logits(hf, prompt), atol=TOL, rtol=TOL
    )


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_phi3_from_gguf(qtype: str, family_dirs: dict[str, str], tmp_path: Any) -> None:
    """Phi-3 as llama.cpp's converter writes it: fused attn_qkv and ffn_up (gate then up),
    LongRoPE factors as tensors, the window in the metadata. F32 equals transformers; a
    Q8_0 file keeps its blocks through the split (rows of whole blocks) and differs from
    its own dequantized reference only by the activations' quantization."""
    import gguf
    from safetensors.torch import load_file

    hf_dir = family_dirs["Phi3ForCausalLM"]
    cfg = family_config("Phi3ForCausalLM")
    rope = cfg.rope_parameters
    sd = {k: v.float().numpy() for k, v in load_file(f"{hf_dir}/model.safetensors").items()}
    path = str(tmp_path / f"phi3-{qtype}.gguf")
    w = _gguf_writer(path, "phi3", cfg, float(rope["rope_theta"]))
    w.add_sliding_window(WINDOW)
    w.add_rope_dimension_count(32)
    w.add_uint32("phi3.rope.scaling.original_context_length", cfg.original_max_position_embeddings)
    w.add_float32("phi3.rope.scaling.attn_factor", 1.5)
    w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
    w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
             "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    for name, arr in sd.items():
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            out = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm",
                   "lm_head.weight": "output"}[name]  # fmt: skip
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            out = f"blk.{layer}.{names[rest.removesuffix('.weight')]}"
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if qtype == "Q8_0" and out.startswith("blk.") and arr.ndim == 2:
            kind = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(f"{out}.weight", gguf.quants.quantize(arr, kind), raw_dtype=kind)
        else:
            w.add_tensor(f"{out}.weight", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    llm = LLM(path, tokenizer=hf_dir, dtype="float32", block_size=4, kv_cache_memory=8 << 20)
    got = llm.engine.config.model.hf_config
    assert got.sliding_window == WINDOW and got.original_max_position_embeddings == 128
    params = got.rope_parameters
    assert params["long_factor"] == pytest.approx(rope["long_factor"])
    assert params["short_factor"] == pytest.approx(rope["short_factor"])
    prompt = _prompt(4 * WINDOW, 5)  # past the window, inside the short factors' range
    logits = prompt_logits(llm, prompt)
    if qtype == "F32":
        # The attention factor written above (1.5) replaces the default sqrt(1 + ln 4 / ln 128).
        from transformers import AutoConfig, AutoModelForCausalLM

        ref_cfg = AutoConfig.from_pretrained(hf_dir)
        ref_cfg.rope_parameters["attention_factor"] = 1.5
        hf = AutoModelForCausalLM.from_pretrained(
            hf_dir, config=ref_cfg, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        torch.testing.assert_close(logits, hf_logits(hf, prompt), atol=TOL, rtol=TOL)
        return
    ref = LLM(path, tokenizer=hf_dir, dtype="float32", quantization="none", block_size=4,
              kv_cache_memory=8 << 20)  # fmt: skip
    layer = llm.engine.core.runner.model.model.layers[0]
    ref_layer = ref.engine.core.runner.model.model.layers[0]
    torch.manual_seed(0)
    for name in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
        # The fused tensors' shards stay Q8_0 blocks, and compute what the dequantized
        # weights do up to the activations' int8 rounding.
        lin, ref_lin = layer.get_submodule(name), ref_layer.get_submodule(name)
        assert lin.method.name == "gguf" and ref_lin.method.name == "none"
        x = torch.randn(5, cfg.hidden_size)
        got, want = lin(x), ref_lin(x)
        assert (got - want).abs().max() < 0.02 * want.abs().max(), name
    want = prompt_logits(ref, prompt)
    assert (logits - want).abs().mean() < 0.1 * want.abs().mean()


def test_draft_model_beside_a_mixed_target(family_dirs: dict[str, str]) -> None:
    """Gemma 3 (local, global, local: three KV cache groups) with itself as the draft:
    the draft keeps its KV through group 0's table (the global layer's, whole length), so
    greedy output is the target's and nearly every proposal is accepted; the blocks of
    every group come back."""
    path = family_dirs["Gemma3ForCausalLM"]
    kw: dict[str, Any] = dict(dtype="float32", block_size=4, kv_cache_memory=16 << 20)
    prompts = [{"prompt_token_ids": _prompt(n, 20 + n)} for n in (2 * WINDOW + 3, 5)]
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ref = LLM(path, **kw).generate(prompts, sp, use_tqdm=False)
    spec = {"method": "draft_model", "model": path, "num_speculative_tokens": 3}
    llm = LLM(path, speculative_config=spec, **kw)
    out = llm.generate(prompts, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    drafts = sum(o.metrics.spec_num_draft_tokens for o in out)
    assert drafts > 0 and sum(o.metrics.spec_num_accepted_tokens for o in out) / drafts > 0.9
    kv = llm.engine.core.scheduler.kv
    assert kv.pool.num_free_blocks == kv.pool.num_blocks


def test_memory_plan_counts_each_group_and_speculative_slots() -> None:
    """Blocks one max_model_len request holds: a full group its length, a sliding group
    its window (decoding) or window + a prefill chunk (peak), every group the slots
    speculative decoding holds past the tokens at its peak."""
    from pagellm.config import kv_cache_layout
    from pagellm.worker.kv_cache import KVCachePlan

    layout = kv_cache_layout([64, None, 64, 64])  # 1 full, 3 sliding -> 4 groups of 1
    plan = KVCachePlan(0, 0, 16, 1000, 0, 1024, layout, max_chunk=256, spec_slots=5)
    assert layout.windows == (None, 64, 64, 64)
    assert plan.blocks_per_request() == 64 + 3 * (64 + 32) // 16
    assert plan.blocks_per_request(decoding=False) == -(-1029 // 16) + 3 * -(
        -(64 + 256 + 16 + 5) // 16
    )
    assert plan.max_concurrency == pytest.approx(1000 / plan.blocks_per_request())
