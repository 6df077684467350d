"""CUDA checks of pagellm on a tiny random Llama (SmolLM2's tokenizer): fp32 greedy parity
with transformers on the GPU, bf16 agreement, int8/int4 quantization, structured outputs,
LoRA mixed batches vs peft. Prints one JSON line per check."""
# Run on a CUDA machine from the repository root, with pagellm's dependencies installed and
# SmolLM2's tokenizer saved to a directory (no network needed):
#   python -c "from pagellm.engine.tokenizer import load_tokenizer; from pagellm.models.loader import default_model_path; load_tokenizer(default_model_path()).save_pretrained('tok')"
#   python scripts/cuda_check.py tok


import copy
import gc
import json
import re
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

sys.path.insert(0, ".")
from pagellm import LLM, LoRARequest, SamplingParams  # noqa: E402

out = {}


def report(name, **kw):
    out[name] = kw
    print(json.dumps({"check": name, **kw}), flush=True)


TOKENIZER = sys.argv[1] if len(sys.argv) > 1 else ".gpu/tok"
tok = AutoTokenizer.from_pretrained(TOKENIZER)
cfg = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  rms_norm_eps=1e-5, initializer_range=0.05, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
tiny = "/tmp/tiny"
hf.save_pretrained(tiny)
tok.save_pretrained(tiny)
hf = hf.cuda()
prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "Water boils at"]
N = 16


def hf_greedy(model, p):
    ids = torch.tensor([tok.encode(p)], device="cuda")
    with torch.no_grad():
        o = model.generate(ids, max_new_tokens=N, do_sample=False, attention_mask=torch.ones_like(ids),
                           pad_token_id=0, eos_token_id=None)
    return o[0, ids.shape[1]:].tolist()


ref = [hf_greedy(hf, p) for p in prompts]
greedy = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)


def make(**kw):
    return LLM(model=tiny, device="cuda", max_model_len=512, gpu_memory_utilization=0.15, **kw)


def free(llm):
    del llm
    gc.collect()
    torch.cuda.empty_cache()


try:
    llm = make(dtype="float32")
    t = time.time()
    got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
    report("fp32_greedy_vs_transformers_cuda", equal=[g == r for g, r in zip(got, ref)],
           backend=llm.engine.core.runner.attn_backend.name, seconds=round(time.time() - t, 2))
    # structured outputs on CUDA (the bitmask applied to GPU logits)
    from pagellm.core.structured_output import StructuredOutputsParams
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
              "ok": {"type": "boolean"}}, "required": ["n", "ok"], "additionalProperties": False}
    so = [SamplingParams(temperature=0.8, seed=i, max_tokens=60,
                         structured_outputs=StructuredOutputsParams(json=schema)) for i in range(4)]
    texts = [o.outputs[0].text for o in llm.generate(prompts, so, use_tqdm=False)]
    ok = []
    for t_ in texts:
        try:
            v = json.loads(t_)
            ok.append(set(v) == {"n", "ok"} and 0 <= v["n"] <= 99 and isinstance(v["ok"], bool))
        except ValueError:
            ok.append(False)
    rx = SamplingParams(temperature=1.0, seed=3, max_tokens=20,
                        structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[0-9]{4}"))
    rtext = llm.generate(prompts[0], rx, use_tqdm=False)[0].outputs[0].text
    report("structured_outputs_cuda", json_valid=ok, regex_match=bool(re.fullmatch(r"[0-9]{3}-[0-9]{4}", rtext)), texts=texts[:2])
    free(llm)
except Exception as e:  # keep going: every check reports
    report("fp32_or_structured_failed", error=repr(e)[:500])

for dtype in ("bfloat16", "float16"):
    try:
        llm = make(dtype=dtype)
        got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
        agree = sum(a == b for g, r in zip(got, ref) for a, b in zip(g, r)) / (len(prompts) * N)
        first = [g[0] == r[0] for g, r in zip(got, ref)]
        report(f"{dtype}_cuda", token_agreement_with_fp32=round(agree, 3), first_token_equal=first)
        free(llm)
    except Exception as e:
        report(f"{dtype}_failed", error=repr(e)[:500])

for q in ("int8", "int4"):
    try:
        llm = make(dtype="float32", quantization=q)
        got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
        agree = sum(a == b for g, r in zip(got, ref) for a, b in zip(g, r)) / (len(prompts) * N)
        report(f"quant_{q}_cuda", token_agreement_with_fp32=round(agree, 3),
               method=llm.engine.core.runner.model.model.layers[0].self_attn.qkv_proj.method.describe(
                   llm.engine.core.runner.model.model.layers[0].self_attn.qkv_proj))
        free(llm)
    except Exception as e:
        report(f"quant_{q}_failed", error=repr(e)[:500])

try:
    from peft import LoraConfig, PeftModel, get_peft_model
    dirs = {}
    for i, (r, targets) in enumerate(((8, ["q_proj", "v_proj"]), (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))):
        torch.manual_seed(10 + i)
        pm = get_peft_model(copy.deepcopy(hf).cpu(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_A" in n:
                    p.normal_(0, 1.0 / p.shape[1] ** 0.5)
                elif "lora_B" in n:
                    p.normal_(0, 0.3)
        d = f"/tmp/lora{i}"
        pm.save_pretrained(d)
        dirs[f"a{i}"] = d
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), dirs["a0"], adapter_name="a0")
    peft_model.load_adapter(dirs["a1"], adapter_name="a1")
    peft_model.eval()
    lref = {}
    for name in dirs:
        peft_model.set_adapter(name)
        lref[name] = [hf_greedy(peft_model, p) for p in prompts]
    llm = make(dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16)
    reqs = {n: LoRARequest(n, i + 1, d) for i, (n, d) in enumerate(dirs.items())}
    plan = ["a0", None, "a1", "a0"]
    outs = llm.generate(prompts, greedy, lora_request=[reqs[n] if n else None for n in plan], use_tqdm=False)
    eq = []
    for i, (n, o) in enumerate(zip(plan, outs)):
        want = (lref[n] if n else ref)[i]
        eq.append(list(o.outputs[0].token_ids) == want)
    report("lora_mixed_batch_vs_peft_cuda", equal=eq, adapters_change_output=[lref[n] != ref for n in dirs])
    free(llm)
except Exception as e:
    report("lora_failed", error=repr(e)[:800])

print("SUMMARY", json.dumps(out))
