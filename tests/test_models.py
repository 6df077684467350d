"""Every architecture against transformers on a tiny random model (fp32).

Prompts span many KV blocks (block_size=4) and, with a token budget of 16, are
prefilled in chunks while other requests decode in the same steps.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from pagellm import LLM, SamplingParams
from tests.conftest import TINY_ARCHS, hf_logits
from tests.utils import captured_logits

TOL = 2e-4


def _hf(path: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [37, 5, 23, 61, 2, 16][:n]
    return [[rng.randrange(100, 49000) for _ in range(k)] for k in lengths]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_raw_logits_equal_hf(arch: str, tiny_model_dirs: dict[str, str]) -> None:
    """The logits pagellm computes (captured at the LM head) equal transformers' logits."""
    path = tiny_model_dirs[arch]
    llm = LLM(
        path, dtype="float32", block_size=4, kv_cache_memory=8 << 20, max_num_batched_tokens=512
    )
    prompt = _prompts(1, 1)[0]
    with captured_logits(llm) as captured:
        llm.generate(
            [prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False
        )
    # One step: the sampling row (last position) first, then prompt rows 0..n-2.
    (rows,) = captured
    ref = hf_logits(_hf(path), prompt)
    n = len(prompt)
    torch.testing.assert_close(rows[0], ref[n - 1], atol=TOL, rtol=TOL)
    torch.testing.assert_close(rows[1:], ref[: n - 1], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_batched_chunked_distributions_equal_hf(
    arch: str, backend: str, tiny_model_dirs: dict[str, str]
) -> None:
    """Prompt and decode log-probabilities of a mixed batch equal transformers'."""
    path = tiny_model_dirs[arch]
    llm = LLM(
        path,
        dtype="float32",
        block_size=4,
        kv_cache_memory=8 << 20,
        max_num_batched_tokens=16,
        attention_backend=backend,
        native_kernels=backend == "auto",
        enable_prefix_caching=False,
    )
    prompts = _prompts(6, 2)
    params = SamplingParams(
        max_tokens=6, temperature=0, logprobs=5, prompt_logprobs=5, ignore_eos=True
    )
    outs = llm.generate(prompts, params, use_tqdm=False)
    hf = _hf(path)
    for prompt, out in zip(prompts, outs):
        gen = out.outputs[0].token_ids
        assert len(gen) == 6
        full = prompt + gen
        ref = hf_logits(hf, full).log_softmax(-1)
        # Greedy: every generated token is the reference argmax of its position.
        assert gen == ref[len(prompt) - 1 : len(full) - 1].argmax(-1).tolist()
        assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
        for pos, lp in enumerate(out.prompt_logprobs[1:], start=1):
            assert lp is not None
            for tok, val in lp.items():
                assert abs(val.logprob - ref[pos - 1, tok].item()) < TOL, (pos, tok)
        lps = out.outputs[0].logprobs
        assert lps is not None
        for i, lp in enumerate(lps):
            row = ref[len(prompt) - 1 + i]
            top = row.topk(5)
            assert set(lp) == {gen[i], *top.indices.tolist()}
            for tok, val in lp.items():
                assert abs(val.logprob - row[tok].item()) < TOL


def test_unknown_architecture_is_refused(tmp_path: Any, tiny_model_dirs: dict[str, str]) -> None:
    import json
    import shutil

    src = tiny_model_dirs["LlamaForCausalLM"]
    dst = tmp_path / "weird"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["GPTWeirdForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"GPTWeirdForCausalLM.*supported: .*LlamaForCausalLM"):
        LLM(str(dst))
