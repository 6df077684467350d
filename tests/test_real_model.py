"""The real SmolLM2-135M-Instruct GGUF, end to end, against transformers' own GGUF loader."""

from __future__ import annotations

from typing import Any

import torch

from pagellm import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "import numpy as np\nx = np.arange(10)\n",
    "The quick brown fox",
    "In 1969, the first humans",
    "My favourite recipe for pancakes starts with",
    "Q: What is 12 times 12?\nA:",
]


def test_greedy_batch_equals_transformers(smol_llm: Any, hf_smol: Any, smol_tokenizer: Any) -> None:
    """Ten prompts generated together equal transformers' greedy output token for token."""
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = smol_llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.prompt for o in outs] == PROMPTS
    for prompt, out in zip(PROMPTS, outs):
        ids = smol_tokenizer(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            # No EOS for the reference either (-1 never matches; min_new_tokens would
            # instead mask EOS out of the distribution).
            ref = hf_smol.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                eos_token_id=-1, pad_token_id=2,
            )  # fmt: skip
        expected = ref[0, ids.shape[1] :].tolist()
        assert out.outputs[0].token_ids == expected, prompt
        assert out.outputs[0].text == smol_tokenizer.decode(expected, skip_special_tokens=True)
        assert out.outputs[0].finish_reason == "length"


def test_eos_stops_generation(smol_llm: Any) -> None:
    out = smol_llm.chat(
        [{"role": "user", "content": "Say hello."}],
        SamplingParams(temperature=0, max_tokens=200),
        use_tqdm=False,
    )[0]
    comp = out.outputs[0]
    assert comp.finish_reason == "stop"
    assert comp.stop_reason is None  # EOS, not a stop string or stop token
    assert comp.token_ids[-1] == 2  # <|im_end|>
    assert "<|im_end|>" not in comp.text and comp.text.strip()


def test_metrics_and_order(smol_llm: Any) -> None:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 9, 1, 5)]
    outs = smol_llm.generate(PROMPTS[:4], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 9, 1, 5]
    for o in outs:
        m = o.metrics
        assert m is not None and o.finished
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
        assert m.num_generation_tokens == len(o.outputs[0].token_ids)
