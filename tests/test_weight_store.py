"""Weights in a file-backed mapping (CPU) and streamed from host memory (the GPU
offloader's mechanism, run here on the CPU): same tokens, pages that really come from
the file, nothing resident that was not touched."""

from __future__ import annotations

from typing import Any

import pytest

from pagellm import LLM, SamplingParams
from pagellm.models.weight_store import resident_bytes

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
GREEDY = SamplingParams(temperature=0, max_tokens=16)


def _texts(llm: LLM) -> list[str]:
    return [o.outputs[0].text for o in llm.generate(PROMPTS, GREEDY)]


def test_mapped_weights_give_the_same_tokens_and_page_in_from_the_file(
    smol_llm_default: LLM, tmp_path: Any
) -> None:
    want = _texts(smol_llm_default)
    llm = LLM(max_model_len=1024, kv_cache_memory="64MiB", weight_mmap_dir=str(tmp_path))
    runner = llm.engine.core.runner
    wfile = runner.model.weight_file
    # Almost every byte of the (GGUF, repacked) weights lives in the file.
    assert wfile.mapped_bytes > 0.9 * runner.weight_bytes
    assert list(tmp_path.iterdir()) == []  # unlinked: nothing is left behind
    assert _texts(llm) == want
    # Drop every page: anonymous memory would read back zeros (and garbage tokens); the
    # file gives the weights back, and only what a step touches comes back resident.
    wfile.drop_resident()
    assert resident_bytes(wfile.ranges) < 0.05 * wfile.mapped_bytes
    assert _texts(llm) == want
    assert resident_bytes(wfile.ranges) > 0.5 * wfile.mapped_bytes


def test_unquantized_checkpoint_loads_into_the_mapping(
    tiny_model_dirs: dict[str, str], tmp_path: Any
) -> None:
    path = tiny_model_dirs["LlamaForCausalLM"]
    args: dict[str, Any] = dict(model=path, dtype="float32", kv_cache_memory="16MiB")
    want = _texts(LLM(**args))
    llm = LLM(**args, weight_mmap_dir=str(tmp_path))
    assert llm.engine.core.runner.model.weight_file.mapped_bytes > 0
    assert _texts(llm) == want


def test_host_offload_streams_layers_and_keeps_the_tokens(
    tiny_model_dirs: dict[str, str],
) -> None:
    from pagellm.models.weight_store import offload_to_host

    path = tiny_model_dirs["LlamaForCausalLM"]
    llm = LLM(model=path, dtype="float32", kv_cache_memory="16MiB", native_kernels=False)
    want = _texts(llm)
    runner = llm.engine.core.runner
    layers = runner.model.model.layers
    plan = offload_to_host(runner.model, 1, runner.device)  # one layer's worth
    assert plan.layers == ["layers.0"] and plan.bytes > 0
    hosted = [p.data_ptr() for p in layers[0].parameters()]
    assert _texts(llm) == want
    assert plan.streamed_bytes >= 16 * plan.bytes  # copied in for every step
    # After each step the layer points at its host copies again (device copies freed).
    assert [p.data_ptr() for p in layers[0].parameters()] == hosted


def test_weight_options_are_checked(tmp_path: Any) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="weight_mmap_dir"):
        LLM(weight_mmap_dir=str(blocker / "sub"), kv_cache_memory="16MiB")
