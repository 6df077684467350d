"""Quantized linears on CUDA against the unquantized model: prompt log-probability error."""
# Run on a CUDA machine from the repository root, with pagellm's dependencies installed and
# SmolLM2's tokenizer saved to a directory (no network needed):
#   python -c "from pagellm.engine.tokenizer import load_tokenizer; from pagellm.models.loader import default_model_path; load_tokenizer(default_model_path()).save_pretrained('tok')"
#   python scripts/cuda_quant_check.py tok

import gc, json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
sys.path.insert(0, ".")
from pagellm import LLM, SamplingParams

TOKENIZER = sys.argv[1] if len(sys.argv) > 1 else ".gpu/tok"
tok = AutoTokenizer.from_pretrained(TOKENIZER)
cfg = LlamaConfig(vocab_size=49152, hidden_size=512, intermediate_size=1024, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                  initializer_range=0.02, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
hf.save_pretrained("/tmp/tiny2"); tok.save_pretrained("/tmp/tiny2")
text = "The quick brown fox jumps over the lazy dog. " * 8
p = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
res = {}
for device in ("cuda", "cpu"):
    for q in ("none", "int8", "int4"):
        kw = dict(gpu_memory_utilization=0.1) if device == "cuda" else dict(kv_cache_memory="256MiB")
        llm = LLM(model="/tmp/tiny2", device=device, dtype="float32", quantization=q, max_model_len=512, **kw)
        o = llm.generate(text, p, use_tqdm=False)[0]
        lps = [next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]]
        res[(device, q)] = torch.tensor(lps)
        del llm; gc.collect(); torch.cuda.empty_cache()
for device in ("cuda", "cpu"):
    for q in ("int8", "int4"):
        d = (res[(device, q)] - res[(device, "none")]).abs()
        print(json.dumps({"device": device, "quant": q, "mean_abs_logprob_err": round(d.mean().item(), 5), "max": round(d.max().item(), 5)}))
d = (res[("cuda", "none")] - res[("cpu", "none")]).abs()
print(json.dumps({"cuda_vs_cpu_none_max_abs": round(d.max().item(), 6)}))
for q in ("int8", "int4"):
    d = (res[("cuda", q)] - res[("cpu", q)]).abs()
    print(json.dumps({"quant": q, "cuda_vs_cpu_mean_abs": round(d.mean().item(), 5)}))
