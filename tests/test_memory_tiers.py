"""The second KV tier on the real model: swap on preemption gives the same greedy tokens
as recompute, a tier too small falls back to recompute, nothing leaks;
the file tier survives a restart and drops damaged blocks."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import pytest

from pagellm import LLM, SamplingParams

PROMPTS = [f"Tell me a long story about the number {i} and its friends." for i in range(12)]
GREEDY = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
LONG = "The history of paged memory in operating systems, told in detail. " * 12


def run_storm(**kw: Any) -> tuple[list[list[int]], Any]:
    """12 requests in a pool of 40 blocks (a third of what they need): preemptions."""
    llm = LLM(max_model_len=256, num_gpu_blocks_override=40, max_num_seqs=12, **kw)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    core = llm.engine.core
    stats = core.stats()
    kv = core.scheduler.kv
    kv.pool.check()
    assert kv.pool.counts()[2] == 0, "blocks still in use at idle"
    if kv.tier is not None:
        kv.tier.check()
        assert kv.tier.num_pinned == 0
    core.shutdown()
    return [list(o.outputs[0].token_ids) for o in outs], stats


def test_swap_and_recompute_give_the_same_tokens() -> None:
    swapped, s1 = run_storm(swap_space=0.01)
    recomputed, s2 = run_storm(swap_space=0.01, preemption_mode="recompute")
    assert s1.num_preemptions > 0 and s2.num_preemptions > 0
    assert swapped == recomputed
    assert s1.num_swapped_in > 0 and s1.kv_tier_blocks_in > 0  # resumed from the tier
    assert s2.num_swapped_in == 0
    # A tier of two blocks: most preempted blocks find no room, and they are recomputed.
    tiny, s3 = run_storm(swap_space=2 * 16 * 46080 / (1 << 30))
    assert tiny == recomputed
    assert s3.num_preemptions > 0 and s3.kv_tier_blocks_out > 0


def disk_llm(directory: str) -> LLM:
    return LLM(max_model_len=1024, kv_cache_memory="64MiB", kv_offload_size=0.02,
               kv_offload_dir=directory)  # fmt: skip


def ask(llm: LLM) -> tuple[int, list[int]]:
    out = llm.generate([LONG], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    return out.num_cached_tokens, list(out.outputs[0].token_ids)


def test_disk_tier_survives_a_restart_and_drops_damage(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    d = str(tmp_path / "tier")
    llm = disk_llm(d)
    cached, want = ask(llm)
    assert cached == 0
    llm.engine.core.shutdown()
    # A restart: the prompt's blocks come back from the file (all but its last partial).
    llm = disk_llm(d)
    cached, got = ask(llm)
    assert cached >= 160 and got == want
    llm.engine.core.shutdown()
    # Damage one stored block's data: its crc fails, it is dropped with a warning, and
    # the blocks after it cannot be used either (a prefix needs every block before).
    (path,) = [os.path.join(d, f) for f in os.listdir(d)]
    with open(path, "r+b") as f:
        head = f.read(4096)
        meta = json.loads(head[8 : 8 + int.from_bytes(head[4:8], "little")])
        row, num_slots = meta["row_bytes"], meta["num_slots"]
        used = []
        for slot in range(num_slots):
            f.seek(4096 + slot * row)
            if f.read(4) == b"PGKV":
                used.append(slot)
        assert len(used) >= 10
        f.seek(4096 + used[0] * row + 64 + 100)  # one stored block's data
        f.write(b"\x7f" * 64)
    with caplog.at_level(logging.WARNING, logger="pagellm.worker.kv_cache"):
        llm = disk_llm(d)
        cached, got = ask(llm)
    assert got == want
    assert any("1 damaged blocks dropped" in r.getMessage() for r in caplog.records)
    assert cached < 160  # that block (or one before it) is recomputed
    llm.engine.core.shutdown()
    # Or a torn file (cut short): replaced whole, never read.
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pagellm.worker.kv_cache"):
        llm = disk_llm(d)
        cached, got = ask(llm)
    assert cached == 0 and got == want
    assert any("torn" in r.getMessage() for r in caplog.records)
    llm.engine.core.shutdown()


def test_tier_options_are_checked() -> None:
    with pytest.raises(ValueError, match="needs a second KV tier"):
        LLM(preemption_mode="swap")
    with pytest.raises(ValueError, match="also set its size"):
        LLM(kv_offload_dir="/tmp/nowhere")
    with pytest.raises(ValueError, match="non-negative"):
        LLM(kv_offload_size=-1)


def test_tier_metrics_count_bytes_and_swapped_requests() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from pagellm.metrics.prometheus import PrometheusStatLogger
    from pagellm.metrics.stats import SchedulerStats

    p = PrometheusStatLogger("m")
    p.record(None, SchedulerStats(kv_tier_bytes_per_block=100, kv_tier_blocks_out=3,
                                  kv_tier_blocks_in=1, num_swapped_in=1))  # fmt: skip
    p.record(None, SchedulerStats(kv_tier_bytes_per_block=100, kv_tier_blocks_out=5,
                                  kv_tier_blocks_in=4, num_swapped_in=2,
                                  prefix_cache_tier_hits=64))  # fmt: skip
    values = {
        s.name: s.value
        for f in text_string_to_metric_families(p.render().decode())
        for s in f.samples
    }
    assert values["pagellm:kv_tier_bytes_out_total"] == 500
    assert values["pagellm:kv_tier_bytes_in_total"] == 400
    assert values["pagellm:num_requests_swapped_in_total"] == 2
    assert values["pagellm:prefix_cache_tier_hits_total"] == 64
