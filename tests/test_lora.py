"""Multi-LoRA: PEFT adapters made on the real SmolLM2 weights, checked against
transformers + peft token for token; mixed batches, the adapter LRU, the prefix cache,
bad adapters, and run-time loading through the server with the official client."""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from typing import Any

import httpx
import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.lora import LoRARequest

# name -> (rank, alpha, targets, rsLoRA)
ADAPTERS: dict[str, tuple[int, int, list[str], bool]] = {
    "attn8": (8, 16, ["q_proj", "v_proj"], False),
    "all16": (
        16,
        32,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        True,
    ),
    "mlp4": (4, 8, ["o_proj", "gate_proj", "up_proj", "down_proj"], False),
}
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "Water boils at a temperature of",
]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, hf_smol: Any) -> dict[str, str]:
    """Three PEFT adapters of different ranks and targets with random (non-zero) weights."""
    from peft import LoraConfig, get_peft_model

    dirs = {}
    for i, (name, (r, alpha, targets, rs)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        base = copy.deepcopy(hf_smol)
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rs,
                         lora_dropout=0.0, init_lora_weights=False)  # fmt: skip
        model = get_peft_model(base, cfg)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_A" in pname:
                    p.normal_(0, 1.0 / p.shape[1] ** 0.5)
                elif "lora_B" in pname:
                    p.normal_(0, 0.04)
        path = tmp_path_factory.mktemp(f"lora_{name}")
        model.save_pretrained(path)
        dirs[name] = str(path)
        del model, base
    return dirs


@pytest.fixture(scope="module")
def peft_reference(
    adapter_dirs: dict[str, str], hf_smol: Any, smol_tokenizer: Any
) -> dict[str | None, list[list[int]]]:
    """Greedy tokens of every prompt under each adapter (None: the base) from transformers+peft."""
    from peft import PeftModel

    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(
        copy.deepcopy(hf_smol), adapter_dirs[names[0]], adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    model.eval()

    def greedy(prompt: str) -> list[int]:
        ids = torch.tensor([smol_tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False,
                                 attention_mask=torch.ones_like(ids), pad_token_id=0)  # fmt: skip
        return list(out[0, ids.shape[1] :].tolist())

    ref: dict[str | None, list[list[int]]] = {}
    for name in names:
        model.set_adapter(name)
        ref[name] = [greedy(p) for p in PROMPTS]
    with model.disable_adapter():
        ref[None] = [greedy(p) for p in PROMPTS]
    return ref


@pytest.fixture(scope="module")
def lora_llm() -> Any:
    return LLM(max_model_len=512, kv_cache_memory="128MiB", dtype="float32", quantization="none",
               enable_lora=True, max_loras=3, max_lora_rank=16)  # fmt: skip


def _requests(adapter_dirs: dict[str, str]) -> dict[str, LoRARequest]:
    return {n: LoRARequest(n, i + 1, p) for i, (n, p) in enumerate(adapter_dirs.items())}


def _stop_free(tokens: list[int], ref: list[int]) -> list[int]:
    """transformers stops at EOS too; compare the same span."""
    return ref[: len(tokens)]


def test_mixed_batch_equals_peft_token_for_token(
    lora_llm: Any, adapter_dirs: dict[str, str], peft_reference: dict[str | None, list[list[int]]]
) -> None:
    reqs = _requests(adapter_dirs)
    # Base, every adapter, and one adapter twice non-adjacent: one batch, one call.
    plan: list[str | None] = [None, "attn8", "all16", "attn8", "mlp4", None]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    outs = lora_llm.generate(PROMPTS, params, lora_request=[reqs[n] if n else None for n in plan])
    for i, (name, out) in enumerate(zip(plan, outs)):
        got = list(out.outputs[0].token_ids)
        want = peft_reference[name][i]
        assert got == want[: len(got)] and len(got) >= min(len(want), MAX_TOKENS), (
            name,
            i,
            got,
            want,
        )
    # The same step through the modules (one LoRA call per Linear) instead of the native
    # layer stack (LoRA inside the single call): identical tokens and logprobs.
    model = lora_llm.engine.core.runner.model.model
    lp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=1)
    loras = [reqs[n] if n else None for n in plan]
    stacked = lora_llm.generate(PROMPTS, lp, lora_request=loras)
    model.native_stack_enabled = False
    try:
        modules = lora_llm.generate(PROMPTS, lp, lora_request=loras)
    finally:
        model.native_stack_enabled = True
    for a, b in zip(stacked, modules):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == pytest.approx(
            b.outputs[0].cumulative_logprob, abs=1e-4
        )
    # The adapters really change the output (the comparison above can fail).
    for name in ADAPTERS:
        assert peft_reference[name] != peft_reference[None], name


def test_more_adapters_than_slots_wait_and_reload(
    adapter_dirs: dict[str, str], peft_reference: dict[str | None, list[list[int]]]
) -> None:
    """max_loras=1: requests of different adapters never share a step; max_cpu_loras=1
    evicts and reloads. Output is unchanged."""
    llm = LLM(max_model_len=256, kv_cache_memory="64MiB", dtype="float32", quantization="none",
              enable_lora=True, max_loras=1, max_cpu_loras=1, max_lora_rank=16)  # fmt: skip
    reqs = _requests(adapter_dirs)
    plan = ["mlp4", "attn8", "all16", None, "attn8"]
    outs = llm.generate(PROMPTS[: len(plan)], SamplingParams(temperature=0, max_tokens=8),
                        lora_request=[reqs[n] if n else None for n in plan])  # fmt: skip
    for i, (name, out) in enumerate(zip(plan, outs)):
        got = list(out.outputs[0].token_ids)
        assert got == peft_reference[name][i][: len(got)], (name, i)
    runner = llm.engine.core.runner
    assert len(runner.lora_manager.loaded) <= 1


def test_prefix_cache_never_mixes_adapters(lora_llm: Any, adapter_dirs: dict[str, str]) -> None:
    reqs = _requests(adapter_dirs)
    prompt = "Tell me a long story about a dragon who learned to read. " * 6
    params = SamplingParams(temperature=0, max_tokens=4)

    def cached(lora: LoRARequest | None) -> int:
        return int(lora_llm.generate(prompt, params, lora_request=lora)[0].num_cached_tokens)

    assert cached(reqs["attn8"]) == 0
    assert cached(reqs["all16"]) == 0  # same tokens, other adapter: no hit
    assert cached(None) == 0  # nor the base model
    assert cached(reqs["attn8"]) >= 48  # same adapter again: its own blocks hit
    assert cached(None) >= 48


def _write_adapter(path: Any, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    return str(path)


def test_bad_adapters_are_refused_with_a_clear_error(
    lora_llm: Any, adapter_dirs: dict[str, str], tmp_path: Any
) -> None:
    params = SamplingParams(max_tokens=2)
    cases = {
        "is not a directory": LoRARequest("missing", 50, str(tmp_path / "nowhere")),
        "over max_lora_rank 16": LoRARequest(
            "big",
            51,
            _write_adapter(
                tmp_path / "big",
                {"r": 32, "lora_alpha": 32, "target_modules": ["q_proj"]},
                {
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(
                        32, 576
                    ),
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(
                        576, 32
                    ),
                },
            ),
        ),
        "unknown target modules ['embed_tokens']": LoRARequest(
            "emb",
            52,
            _write_adapter(
                tmp_path / "emb",
                {"r": 4, "lora_alpha": 4, "target_modules": ["embed_tokens"]},
                {"base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(4, 49152)},
            ),
        ),
        "expected A (r, 576)": LoRARequest(
            "shape",
            53,
            _write_adapter(
                tmp_path / "shape",
                {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]},
                {
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(
                        4, 100
                    ),
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(
                        576, 4
                    ),
                },
            ),
        ),
    }
    for message, lora in cases.items():
        with pytest.raises(
            ValueError,
            match=message.replace("[", r"\[")
            .replace("]", r"\]")
            .replace("(", r"\(")
            .replace(")", r"\)"),
        ):
            lora_llm.generate("Hello", params, lora_request=lora)
        assert lora.lora_int_id not in lora_llm.engine.core.runner.lora_manager.loaded
    # One id, two paths: refused.
    paths = list(adapter_dirs.values())
    lora_llm.generate("Hi", params, lora_request=LoRARequest("x", 60, paths[0]))
    with pytest.raises(ValueError, match="lora_int_id 60"):
        lora_llm.generate("Hi", params, lora_request=LoRARequest("y", 60, paths[1]))
    # The engine still serves after the refusals.
    assert lora_llm.generate("Hi", params)[0].outputs[0].token_ids


def test_lora_needs_enable_lora(smol_llm: Any, adapter_dirs: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="enable_lora"):
        smol_llm.generate("Hi", SamplingParams(max_tokens=2),
                          lora_request=LoRARequest("a", 1, adapter_dirs["attn8"]))  # fmt: skip


def test_server_lists_loads_and_unloads_adapters(
    adapter_dirs: dict[str, str],
    peft_reference: dict[str | None, list[list[int]]],
    smol_tokenizer: Any,
) -> None:
    import openai

    from tests.utils import RemoteServer

    srv = RemoteServer([
        "--max-model-len", "512", "--kv-cache-memory", "128MiB", "--dtype", "float32",
        "--quantization", "none", "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
        "--lora-modules", f"attn8={adapter_dirs['attn8']}",
        json.dumps({"name": "mlp4", "path": adapter_dirs["mlp4"]}),
        "--allow-runtime-lora",
    ])  # fmt: skip
    try:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x")
        models = {m.id: m for m in client.models.list().data}
        base = next(m for m in models if m not in ("attn8", "mlp4"))
        assert set(models) == {base, "attn8", "mlp4"}
        assert models["attn8"].model_extra["parent"] == base
        assert models["attn8"].model_extra["root"] == adapter_dirs["attn8"]

        def check(model: str, name: str | None, i: int) -> None:
            """The server's greedy text equals peft's greedy tokens, decoded."""
            r = client.completions.create(
                model=model, prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0
            )
            assert r.model == model
            want = smol_tokenizer.decode(peft_reference[name][i], skip_special_tokens=True)
            assert r.choices[0].text == want, (model, i)

        check("attn8", "attn8", 1)
        check("mlp4", "mlp4", 2)

        # Run-time load, use, unload.
        http = httpx.Client(base_url=srv.url(""), timeout=60)
        r = http.post(
            "/v1/load_lora_adapter", json={"lora_name": "all16", "lora_path": adapter_dirs["all16"]}
        )
        assert r.status_code == 200, r.text
        check("all16", "all16", 3)
        assert "all16" in {m.id for m in client.models.list().data}
        # Bad loads: a name in use, a missing path; nothing is loaded.
        r = http.post(
            "/v1/load_lora_adapter", json={"lora_name": "all16", "lora_path": adapter_dirs["all16"]}
        )
        assert r.status_code == 400 and "already" in r.json()["error"]["message"]
        r = http.post(
            "/v1/load_lora_adapter", json={"lora_name": "nope", "lora_path": "/does/not/exist"}
        )
        assert r.status_code == 400 and "not a directory" in r.json()["error"]["message"]
        assert "nope" not in {m.id for m in client.models.list().data}
        # Unloading while a stream uses the adapter: the stream finishes in full, then the
        # unload returns.
        stream = client.completions.create(model="all16", prompt=PROMPTS[4], max_tokens=48,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        first = next(iter(stream))
        running = http.get("/metrics").text
        assert 'running_lora_adapters="all16"' in running  # lora_requests_info while it runs
        ended: dict[str, Any] = {}

        def read_rest() -> None:
            pieces = [first.choices[0].text] + [c.choices[0].text for c in stream if c.choices]
            ended["time"], ended["text"] = time.monotonic(), "".join(pieces)

        reader = threading.Thread(target=read_rest)
        reader.start()
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "all16"})
        reader.join(60)
        assert r.status_code == 200, r.text
        # The running request was not cut short (48 tokens; decoding may merge a few).
        assert "time" in ended
        assert len(smol_tokenizer.encode(ended["text"], add_special_tokens=False)) >= 40
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="all16", prompt="Hi", max_tokens=2)
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "all16"})
        assert r.status_code == 404
        # The base model still answers.
        check(base, None, 0)
        # vLLM's lora_requests_info gauge: one series, nothing running at the end.
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
        for name in ("pagellm:lora_requests_info", "vllm:lora_requests_info"):
            (series,) = families[name].samples
            assert series.labels == {"engine": "0", "max_lora": "2", "running_lora_adapters": "",
                                     "waiting_lora_adapters": ""}  # fmt: skip
            assert series.value > 1.7e9  # a timestamp
    finally:
        assert srv.stop() == 0, srv.logs()
    assert "Traceback" not in srv.logs()


def test_runtime_lora_endpoints_are_off_by_default(
    server: Any, adapter_dirs: dict[str, str]
) -> None:
    from tests.conftest import API_KEY

    r = httpx.post(server.url("/v1/load_lora_adapter"), headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"lora_name": "a", "lora_path": adapter_dirs["attn8"]}, timeout=30)  # fmt: skip
    assert r.status_code == 404 and "--allow-runtime-lora" in r.json()["error"]["message"]


def test_native_lora_kernel_equals_the_torch_path() -> None:
    """One native call per Linear (every group, shard ranges, non-contiguous rows) gives
    what two torch matmuls per group give."""
    from pagellm.layers import native
    from pagellm.lora.layers import LinearLoRA, set_lora_groups

    lib = native.load()
    if lib is None:
        pytest.skip("no native kernels on this machine")
    torch.manual_seed(0)
    shards = {"q": (0, 64), "k": (64, 32), "v": (96, 32)}
    fast, ref = LinearLoRA(shards, 128, lib), LinearLoRA(shards, 128, None)
    for lora_id, targets in ((1, ("q", "v")), (2, ("q", "k", "v")), (3, ("k",))):
        parts = {
            s: (torch.randn(4 + lora_id, 48), torch.randn(shards[s][1], 4 + lora_id))
            for s in targets
        }
        fast.install(lora_id, parts)
        ref.install(lora_id, parts)
    x = torch.randn(11, 48)
    rows = {1: torch.tensor([0, 3, 4, 9]), 2: torch.arange(5, 8), 3: torch.tensor([1, 10])}
    groups = [(i, r if i != 2 else slice(5, 8), r) for i, r in rows.items()]
    base = torch.randn(11, 128)
    with set_lora_groups(groups):
        got = fast.apply(x, base.clone())
        want = ref.apply(x, base.clone())
    expect = base.clone()
    for i, r in rows.items():
        for s, (a, b) in ((s, p) for s, p in _parts_of(ref, i, shards)):
            start, size = shards[s]
            expect[r, start : start + size] += x[r] @ a.t() @ b.t()
    torch.testing.assert_close(want, expect, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Rows 2 and 8 belong to no group: untouched.
    torch.testing.assert_close(got[[2, 8]], base[[2, 8]], rtol=0, atol=0)


def _parts_of(
    layer: Any, lora_id: int, shards: dict[str, tuple[int, int]]
) -> list[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Recover (A, B) per shard from an installed adapter (A rows are stacked in order)."""
    a_all, bt, cols, _ = layer.adapters[lora_id]
    out = []
    for s, (start, size) in shards.items():
        rs = [r for r in range(a_all.shape[0]) if int(cols[0, r]) == start]
        if not rs:
            continue
        lo, hi = rs[0], rs[-1] + 1
        out.append((s, (a_all[lo:hi], bt[lo:hi, start : start + size].t())))
    return out


def test_torch_lora_path_equals_peft(
    adapter_dirs: dict[str, str], peft_reference: dict[str | None, list[list[int]]]
) -> None:
    """Without pagellm's native kernels (the GPU path's code) the output is the same."""
    llm = LLM(max_model_len=256, kv_cache_memory="64MiB", dtype="float32", quantization="none",
              native_kernels=False, enable_lora=True, max_loras=3, max_lora_rank=16)  # fmt: skip
    reqs = _requests(adapter_dirs)
    plan: list[str | None] = ["all16", None, "all16", "mlp4"]
    outs = llm.generate(PROMPTS[: len(plan)], SamplingParams(temperature=0, max_tokens=8),
                        lora_request=[reqs[n] if n else None for n in plan])  # fmt: skip
    for i, (name, out) in enumerate(zip(plan, outs)):
        got = list(out.outputs[0].token_ids)
        assert got == peft_reference[name][i][: len(got)], (name, i)


def test_adapter_gone_after_the_check_fails_only_its_request(
    lora_llm: Any, adapter_dirs: dict[str, str], tmp_path: Any, monkeypatch: Any
) -> None:
    """The engine reads an adapter again when the request arrives; if its files went away
    after the front end's check, that request ends (abort) and the others run on."""
    import shutil

    gone = tmp_path / "gone"
    shutil.copytree(adapter_dirs["attn8"], gone)
    lora = LoRARequest("gone", 70, str(gone))
    processor = lora_llm.engine.input_processor
    processor.check_lora(lora)  # checked while the files exist
    shutil.rmtree(gone)
    monkeypatch.setattr(processor, "check_lora", lambda _lora: None)  # the race, made certain
    params = SamplingParams(temperature=0, max_tokens=6)
    outs = lora_llm.generate(PROMPTS[:3], params, lora_request=[None, lora, None])
    assert outs[1].finished and outs[1].outputs[0].finish_reason == "abort"
    assert outs[1].outputs[0].token_ids == []
    for i in (0, 2):
        assert (
            outs[i].outputs[0].finish_reason == "length" and len(outs[i].outputs[0].token_ids) == 6
        )
    monkeypatch.undo()
    assert 70 not in lora_llm.engine.core.runner.lora_manager.loaded
    # Alone (nothing else in the step) the failed request is still reported.
    monkeypatch.setattr(processor, "check_lora", lambda _lora: None)
    (alone,) = lora_llm.generate(PROMPTS[0], params, lora_request=lora)
    assert alone.outputs[0].finish_reason == "abort"
