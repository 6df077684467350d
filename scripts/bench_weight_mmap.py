"""Batch-1 decode and resident weight pages with and without --weight-mmap-dir, and the
first step after every mapped page is dropped (docs/memory.md). Usage:
    python scripts/bench_weight_mmap.py -            # weights in RAM
    python scripts/bench_weight_mmap.py /var/tmp/wm  # weights mapped from a file there
"""
import sys, time, os
from pagellm import LLM, SamplingParams
from pagellm.models.weight_store import resident_bytes
from pagellm.worker.sleep import rss_bytes
d = sys.argv[1] if sys.argv[1] != "-" else None
llm = LLM(max_model_len=1024, kv_cache_memory="64MiB", **({"weight_mmap_dir": d} if d else {}))
sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
llm.generate(["warm"], sp, use_tqdm=False)
def run():
    t = time.perf_counter(); llm.generate(["Tell me a story"], sp, use_tqdm=False); return 64 / (time.perf_counter() - t)
hot = sorted(run() for _ in range(3))[1]
print(f"mmap={bool(d)} rss_after_load_MiB={rss_bytes()/2**20:.0f} decode_tok_s={hot:.1f}")
if d:
    wf = llm.engine.core.runner.model.weight_file
    print(f"mapped_MiB={wf.mapped_bytes/2**20:.0f} resident_MiB={resident_bytes(wf.ranges)/2**20:.0f}")
    wf.drop_resident(); print(f"after drop rss_MiB={rss_bytes()/2**20:.0f} resident={resident_bytes(wf.ranges)/2**20:.0f}")
    t = time.perf_counter(); llm.generate(["x"], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False); print(f"first step after drop (page cache warm) {1000*(time.perf_counter()-t):.0f} ms")
    wf.drop_resident()
    try:
        open("/proc/sys/vm/drop_caches","w").write("3\n"); ok=True
    except OSError as e: ok=False; print("drop_caches:", e)
    if ok:
        t = time.perf_counter(); llm.generate(["x"], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False); print(f"first step after drop_caches (from disk) {1000*(time.perf_counter()-t):.0f} ms")
    print(f"after step rss_MiB={rss_bytes()/2**20:.0f}")
