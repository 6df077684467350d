"""ModelRunner: SchedulerOutput -> input tensors -> forward -> sample -> ModelRunnerOutput.

The runner keeps a small state per request (its tokens, block table and sampling
parameters), updated from the scheduler's deltas; it never sees a Request. A step is
one flat batch with no padding:

    input_ids[T], positions[T], slot_mapping[T]          one entry per computed token
    query_start_loc[B+1], seq_lens[B], block_tables[B,*] one row per request

(a model with several KV cache groups gets a block table and slot mapping per group:
one AttentionMetadata each, see KVCacheLayout in config.py).

Logits are computed only at rows that produce a token (the last row of a request whose
chunk reaches its end) and at prompt rows of requests that asked for prompt logprobs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import numpy as np
import torch
from torch import nn

from pagellm.config import EngineConfig, kv_cache_layout
from pagellm.core.sched_output import (
    ModelRunnerOutput,
    SchedulerOutput,
    TokenLogprobs,
)
from pagellm.distributed.parallel_state import get_parallel_state, pp_recv, pp_send
from pagellm.layers import native
from pagellm.layers.attention import (
    AttentionBackend,
    AttentionMetadata,
    LayerKVCache,
    get_attention_backend,
    set_forward_context,
)
from pagellm.lora.layers import Group, LoRAManager, set_lora_groups
from pagellm.models.llama import head_dim_of
from pagellm.models.loader import build_model, model_weight_bytes
from pagellm.sample.sampler import Sampler, SamplingMetadata, seeded_generator
from pagellm.utils import tune_cpu_allocator
from pagellm.worker.draft_model import DraftModel
from pagellm.worker.input_batch import InputBatch, RowState
from pagellm.worker.kv_cache import KVCachePlan, KVTierStore, allocate_kv_cache, plan_kv_cache

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner:
    def _build_model(self) -> nn.Module:
        """The model with its weights, where the config keeps them (RAM, a file-backed
        mapping, or partly in host memory on a GPU)."""
        mc = self.config.model
        model = build_model(
            mc.model_path, mc.hf_config, mc.architecture, self.dtype, self.device,
            self.native_lib, mc.quantization, self.quant_lib, self.weight_dtype,
            mc.weight_mmap_dir,
        )  # fmt: skip
        if mc.cpu_offload_bytes > 0:
            from pagellm.models.weight_store import offload_to_host

            offload_to_host(model, mc.cpu_offload_bytes, self.device)
        return model

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device.device)
        self.dtype = _DTYPES[config.model.dtype]
        if config.device.num_threads:
            torch.set_num_threads(config.device.num_threads)
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.native_lib = None
        # The quantized kernels take any run dtype (activations become int8 blocks); the
        # other native kernels are float32 only.
        self.quant_lib = None
        # What unquantized weights are stored in when it is not the activations' dtype.
        self.weight_dtype: torch.dtype | None = None
        if self.device.type == "cpu" and config.device.native_kernels:
            isa = config.device.cpu_isa
            lib = native.load(None if isa == "auto" else isa)
            self.quant_lib = lib
            if lib is not None and self.dtype in (torch.bfloat16, torch.float16):
                # A 16-bit run on the CPU keeps its weights (and KV cache) in 16 bits and
                # computes in float32 between them on the native kernels, one call per
                # step (bf16 weights on vdpbf16ps where the CPU has AVX512-BF16), as
                # llama.cpp does; torch's own bf16 ops cost 2-4x more per step here.
                self.weight_dtype, self.dtype = self.dtype, torch.float32
            if self.dtype == torch.float32:
                self.native_lib = lib
        self.attn_backend = get_attention_backend(
            config.device.attention_backend, self.device, self.dtype,
            head_dim_of(config.model.hf_config), self.native_lib, config.cache.kv_cache_dtype,
        )  # fmt: skip
        mc = config.model
        self.model = self._build_model()
        self.vocab_size = int(mc.hf_config.vocab_size)
        self.block_size = config.cache.block_size
        self.weight_bytes = model_weight_bytes(self.model)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(mc.seed)
        self.sampler = Sampler(generator)
        # A window no shorter than max_model_len never drops a block: such layers share
        # the full-attention layers' group (they still mask by their window).
        # The layout covers every layer (the scheduler's blocks are the same on all
        # pipeline stages); a stage binds and allocates the slots of its own layers.
        self.kv_layout = kv_cache_layout(
            [
                w if w is not None and w < mc.max_model_len else None
                for w in self.model.layer_windows()  # type: ignore[operator]
            ]
        )
        self.parallel = get_parallel_state()
        self.local_layers: list[int] = self.model.local_layer_indices()  # type: ignore[operator]
        placement = self.kv_layout.placement()
        self.local_slots = {placement[i][1] for i in self.local_layers}
        first_attn = self.model.attention_layers()[0]  # type: ignore[operator]
        self.local_kv_heads = int(first_attn.num_kv_heads)
        self.batch = InputBatch(
            config.scheduler.max_num_seqs, mc.max_model_len, self.block_size, self.vocab_size,
            self.kv_layout.num_groups,
        )  # fmt: skip
        self.kv_caches: list[LayerKVCache] = []
        self.plan: KVCachePlan | None = None
        self.kv_tier: KVTierStore | None = None
        self.drafter: DraftModel | None = None
        spec = config.speculative
        if spec is not None and spec.method == "draft_model":
            assert spec.draft is not None
            self.drafter = DraftModel(self, spec.draft)
            self.weight_bytes += self.drafter.weight_bytes
        self.lora_manager: LoRAManager | None = None
        if config.lora is not None:
            lc = config.lora
            self.lora_manager = LoRAManager(
                self.model, mc.hf_config, lc.max_loras, lc.max_cpu_loras, lc.max_lora_rank,
                self.dtype, self.device,
            )  # fmt: skip
        logger.info(
            "model runner: device=%s dtype=%s quantization=%s (%.1f MB of weights) attention=%s "
            "native kernels=%s threads=%d",
            self.device, mc.dtype, mc.quantization.method, self.weight_bytes / 1e6, self.attn_backend.name,
            self.native_lib.pagellm_isa().decode() if self.native_lib is not None else "off",
            torch.get_num_threads(),
        )  # fmt: skip

    # ---- KV cache ---------------------------------------------------------------------

    def plan_kv_cache(self) -> KVCachePlan:
        """This worker's plan: its KV heads and its stage's slots in its budget."""
        mc = self.config.model
        peak = 0
        if self.device.type == "cuda" and self.parallel.world_size == 1:
            peak = self._profile_peak_memory()
        draft_config = self.drafter.hf_config if self.drafter is not None else None
        spec = self.config.speculative
        spec_slots = spec.num_speculative_tokens + spec.num_lookahead_tokens if spec else 0
        parallel = self.parallel.world_size > 1
        return plan_kv_cache(
            mc.hf_config, self.config.cache, self.device, mc.max_model_len, self.weight_bytes, peak,
            draft_config, self.kv_layout, self.config.scheduler.max_num_batched_tokens, spec_slots,
            self.local_kv_heads if parallel else None, len(self.local_slots) if parallel else None,
        )  # fmt: skip

    def allocate_kv_cache(self, plan: KVCachePlan) -> KVCachePlan:
        mc = self.config.model
        kv_dtype = self.config.cache.kv_cache_dtype
        self.plan = plan
        self._bind_kv_cache(
            allocate_kv_cache(
                plan, mc.hf_config, kv_dtype, self.device, None, self.local_kv_heads,
                self.local_slots,
            )
        )  # fmt: skip
        if self.drafter is not None:
            # The draft's own paged KV: as many blocks, addressed by the same block ids.
            dc = self.drafter.hf_config
            self.drafter.bind_kv_cache(
                allocate_kv_cache(self.plan, dc, kv_dtype, self.device, dc.num_hidden_layers)
            )
        if plan.num_tier_slots and self.kv_tier is None:
            pc = self.parallel
            self.kv_tier = KVTierStore(
                self._tier_caches(), plan.num_tier_slots, plan.tier_dir,
                {"model": mc.model, "dtype": mc.dtype, "kv_cache_dtype": kv_dtype,
                 "block_size": plan.block_size, "quantization": mc.quantization.method,
                 "rank": pc.rank,
                 "draft": self.drafter is not None},
            )  # fmt: skip
        return self.plan

    def _tier_caches(self) -> list[LayerKVCache]:
        """Every KV tensor a block id addresses here: the model's slots and the draft's."""
        caches = list(self.kv_caches)
        if self.drafter is not None:
            caches += [layer.kv_cache for layer in self.drafter.model.attention_layers()]  # type: ignore[operator]
        return caches

    def kv_tier_entries(self) -> list[tuple[int, bytes]]:
        """The intact (slot, block hash) pairs of a persistent second tier."""
        return self.kv_tier.entries() if self.kv_tier is not None else []

    def run_tier_ops(self, sched: SchedulerOutput) -> None:
        """The second tier's copies, before anything writes this step: evicted blocks out
        first (their block may be reused below), then hits back in."""
        if self.kv_tier is None or not (sched.kv_offloads or sched.kv_loads):
            return
        self.kv_tier.bind(self._tier_caches())  # cheap views; the pool may be re-allocated
        if sched.kv_offloads:
            self.kv_tier.save(sched.kv_offloads)
        if sched.kv_loads:
            self.kv_tier.load(sched.kv_loads)

    def _bind_kv_cache(self, caches: list[LayerKVCache]) -> None:
        """Bind each layer to its slot's cache and its KV cache group (or unbind: [])."""
        self.kv_caches = caches
        placement = self.kv_layout.placement()
        for i, layer in zip(self.local_layers, self.model.attention_layers()):  # type: ignore[operator]
            group, slot = placement[i]
            cache = caches[slot] if caches else LayerKVCache(torch.empty(0), torch.empty(0))
            layer.bind(cache, self.attn_backend, group)

    @torch.inference_mode()
    def _profile_peak_memory(self) -> int:
        """Activation peak of one full-budget forward pass (CUDA), with a scratch cache."""
        sc = self.config.scheduler
        n = min(sc.max_num_batched_tokens, self.config.model.max_model_len)
        nblk = -(-n // self.block_size)
        scratch = KVCachePlan(0, 0, self.block_size, nblk, 0, n, self.kv_layout)
        self._bind_kv_cache(
            allocate_kv_cache(
                scratch, self.config.model.hf_config, self.config.cache.kv_cache_dtype, self.device
            )
        )
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        G = self.kv_layout.num_groups
        meta = self.build_step_metadata(
            np.array([0, n]), np.array([n]), np.tile(np.arange(nblk, dtype=np.int32), (G, 1, 1)),
            np.tile(np.arange(n, dtype=np.int64), (G, 1)),
        )  # fmt: skip
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device)
        with set_forward_context(meta):
            hidden = self.model(ids, pos)
        self.model.compute_logits(hidden[-1:])  # type: ignore[operator]
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        self._bind_kv_cache([])
        torch.cuda.empty_cache()
        return int(peak)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for cache in self.kv_caches:
            for t in cache.tensors():
                if t.numel():  # (a slot of another pipeline stage is empty here)
                    t[dst] = t[src]

    # ---- state updates --------------------------------------------------------------

    @property
    def requests(self) -> dict[str, RowState]:
        """The requests the worker holds state for (tests look at this)."""
        return self.batch.requests

    def _update_states(self, sched: SchedulerOutput) -> None:
        batch = self.batch
        for req_id in sched.finished_req_ids:
            batch.remove(req_id)
        for new in sched.scheduled_new_reqs:
            batch.add(
                new.req_id, [*new.prompt_token_ids, *new.output_token_ids],
                len(new.prompt_token_ids), new.sampling_params, new.block_ids,
                new.num_computed_tokens,
                # After preemption the prompt's logprobs were already reported.
                prompt_logprobs_done=bool(new.output_token_ids),
                lora_request=new.lora_request,
            )  # fmt: skip
        for cached in sched.scheduled_cached_reqs:
            row = batch.requests[cached.req_id].row
            if cached.num_blocks_kept is not None:
                batch.num_blocks[row] = min(int(batch.num_blocks[row]), cached.num_blocks_kept)
            for group, idx, block in cached.replaced_blocks:
                batch.block_table[group, row, idx] = block
            if cached.new_block_ids and cached.new_block_ids[0]:
                batch.append_blocks(row, cached.new_block_ids)
            if cached.new_token_ids:
                batch.append_tokens(row, cached.new_token_ids)
            batch.num_computed[row] = cached.num_computed_tokens

    # ---- the step ---------------------------------------------------------------------

    def build_metadata(
        self,
        query_start_loc: np.ndarray,
        seq_lens: np.ndarray,
        block_tables: np.ndarray,
        slot_mapping: np.ndarray,
        backend: AttentionBackend | None = None,
    ) -> AttentionMetadata:
        dev = self.device
        backend = backend or self.attn_backend
        q_lens = np.diff(query_start_loc)
        meta = AttentionMetadata(
            num_tokens=int(query_start_loc[-1]),
            num_seqs=len(seq_lens),
            block_size=self.block_size,
            query_start_loc=torch.from_numpy(query_start_loc.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev),
            block_tables=torch.from_numpy(block_tables.astype(np.int32)).to(dev),
            slot_mapping=torch.from_numpy(slot_mapping.astype(np.int64)).to(dev),
            max_query_len=int(q_lens.max()) if len(q_lens) else 0,
            max_seq_len=int(seq_lens.max()) if len(seq_lens) else 0,
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
            backend=backend,
        )
        meta.backend_data = backend.prepare(meta)
        return meta

    def build_step_metadata(
        self,
        query_start_loc: np.ndarray,
        seq_lens: np.ndarray,
        block_tables: np.ndarray,
        slot_mapping: np.ndarray,
    ) -> list[AttentionMetadata]:
        """One AttentionMetadata per KV cache group: ``block_tables`` [G, B, max_blocks],
        ``slot_mapping`` [G, T]; the groups share the per-sequence tensors."""
        first = self.build_metadata(query_start_loc, seq_lens, block_tables[0], slot_mapping[0])
        metas = [first]
        dev = self.device
        for tables, slots in zip(block_tables[1:], slot_mapping[1:]):
            meta = dataclasses.replace(
                first,
                block_tables=torch.from_numpy(tables.astype(np.int32)).to(dev),
                slot_mapping=torch.from_numpy(slots.astype(np.int64)).to(dev),
                extra={},
            )
            meta.backend_data = self.attn_backend.prepare(meta)
            metas.append(meta)
        return metas

    def _pipeline_forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        qsl: np.ndarray,
        seq_lens: np.ndarray,
        block_tables: np.ndarray,
        slot_mapping: np.ndarray,
        states: list[RowState],
        rows: np.ndarray,
        q_lens: np.ndarray,
    ) -> torch.Tensor | None:
        """This stage's part of the step, in micro-batches (GPipe within a step): the
        requests are cut into up to ``pp_size`` runs of about equal tokens; a stage sends
        micro-batch i on (asynchronously) and starts i + 1 while the next stage works on
        i. Returns the last stage's hidden states of the whole batch, None elsewhere."""
        pp = self.parallel
        B = len(seq_lens)
        cuts = np.searchsorted(qsl, np.linspace(0, qsl[-1], min(pp.pp_size, B) + 1)[1:-1])
        bounds = sorted({0, B, *np.clip(cuts, 1, B - 1).tolist()})
        hidden_size = int(self.config.model.hf_config.hidden_size)
        outs, sends = [], []
        for a, b in itertools.pairwise(bounds):
            t0, t1 = int(qsl[a]), int(qsl[b])
            meta = self.build_step_metadata(
                qsl[a : b + 1] - t0, seq_lens[a:b], block_tables[:, a:b], slot_mapping[:, t0:t1]
            )
            hidden_in = None
            if not pp.is_first_stage:
                hidden_in = pp_recv((t1 - t0, hidden_size), self.dtype, self.device, pp.pp_rank - 1)
            groups = (
                self._lora_groups(states[a:b], rows[a:b], q_lens[a:b])
                if self.lora_manager is not None
                else None
            )
            with set_forward_context(meta), set_lora_groups(groups):
                h = self.model(input_ids[t0:t1], positions[t0:t1], hidden_in)
            if pp.is_last_stage:
                outs.append(h)
            else:
                sends.append((pp_send(h, pp.pp_rank + 1), h))
        for work, _ in sends:
            work.wait()
        return torch.cat(outs) if outs else None

    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput | None:
        self._update_states(sched)
        self.run_tier_ops(sched)
        self.copy_blocks(sched.block_copies)
        req_ids = list(sched.num_scheduled_tokens)
        if not req_ids:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        batch = self.batch
        states = [batch.requests[r] for r in req_ids]
        B = len(states)
        bs = self.block_size
        rows = np.fromiter((s.row for s in states), dtype=np.int64, count=B)
        q_lens = np.fromiter(sched.num_scheduled_tokens.values(), dtype=np.int64, count=B)
        spec_map = sched.scheduled_spec_tokens
        spec_lens = np.zeros(B, dtype=np.int64)
        for i, s in enumerate(states):
            spec = spec_map.get(s.req_id)
            if spec:
                # Proposals sit past the request's tokens for this step only (scratch: the
                # accepted ones come back from the scheduler as the request's own).
                n = int(batch.num_tokens[s.row])
                batch.token_ids[s.row, n : n + len(spec)] = spec
                spec_lens[i] = len(spec)
        qsl = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        T = int(qsl[-1])
        starts = batch.num_computed[rows]
        seq_lens = starts + q_lens
        row_of_token = np.repeat(rows, q_lens)
        positions = np.arange(T, dtype=np.int64) - np.repeat(qsl[:-1] - starts, q_lens)
        input_ids = batch.token_ids[row_of_token, positions]
        max_blocks = int(batch.num_blocks[rows].max())
        block_tables = batch.block_table[:, rows, :max_blocks]
        batch_row = np.repeat(np.arange(B), q_lens)
        slot_mapping = (
            block_tables[:, batch_row, positions // bs].astype(np.int64) * bs + positions % bs
        )
        # Rows whose logits we need: the sampling rows (1 + its proposals per request),
        # then prompt-logprob rows.
        num_tokens = batch.num_tokens[rows]
        pooling = [i for i, s in enumerate(states) if s.sampling_params.pooling is not None]
        sample_req_idx = np.nonzero(seq_lens - spec_lens == num_tokens)[0].tolist()
        if pooling:  # embedding requests pool their hidden states instead of sampling
            pooled_rows = set(pooling)
            sample_req_idx = [i for i in sample_req_idx if i not in pooled_rows]
        logits_rows = [
            r for i in sample_req_idx for r in range(int(qsl[i + 1] - 1 - spec_lens[i]), int(qsl[i + 1]))
        ]  # fmt: skip
        prompt_lp_spans: list[tuple[int, int, int, int]] = []  # (req idx, first row, n, first pos)
        for i, s in enumerate(states):
            if s.sampling_params.prompt_logprobs is None or s.prompt_logprobs_done:
                continue
            end_pos = min(int(seq_lens[i]), s.num_prompt_tokens - 1)
            n = end_pos - int(starts[i])
            if n > 0:
                prompt_lp_spans.append((i, len(logits_rows), n, int(starts[i])))
                logits_rows.extend(range(int(qsl[i]), int(qsl[i]) + n))
            if seq_lens[i] >= s.num_prompt_tokens - 1:
                s.prompt_logprobs_done = True

        dev = self.device
        ids_t, pos_t = torch.from_numpy(input_ids).to(dev), torch.from_numpy(positions).to(dev)
        if self.parallel.pp_size == 1:
            meta = self.build_step_metadata(qsl, seq_lens, block_tables, slot_mapping)
            lora_groups = (
                self._lora_groups(states, rows, q_lens) if self.lora_manager is not None else None
            )
            lora_stack = None
            if lora_groups and self.native_lib is not None:
                assert self.lora_manager is not None
                lora_stack = self.lora_manager.stack_step(lora_groups)
            with set_forward_context(meta), set_lora_groups(lora_groups, lora_stack):
                hidden = self.model(ids_t, pos_t)
        else:
            stage_out = self._pipeline_forward(
                ids_t, pos_t, qsl, seq_lens, block_tables, slot_mapping, states, rows, q_lens
            )
            if stage_out is None:  # an earlier stage: its hidden states went on
                batch.num_computed[rows] = seq_lens
                return None
            hidden = stage_out
        draft_out: dict[str, list[int]] = {}
        pooled = (
            self._pool(
                hidden,
                [states[i] for i in pooling],
                qsl[pooling],
                qsl[[i + 1 for i in pooling]],
                seq_lens[pooling],
            )
            if pooling
            else {}
        )
        sampled_lists: list[list[int]] = [[] for _ in range(B)]
        logprobs_out: list[list[TokenLogprobs] | None] | None = None
        prompt_logprobs: dict[str, list[TokenLogprobs]] = {}
        if logits_rows:
            lrows = torch.as_tensor(logits_rows, device=dev)
            logits = self.model.compute_logits(hidden.index_select(0, lrows))  # type: ignore[operator]
            sample_states = [states[i] for i in sample_req_idx]
            drafts = [spec_map.get(s.req_id, []) for s in sample_states]
            # Each sampling request's first sampler row (1 + its proposals rows each).
            row_of = np.cumsum([0] + [len(d) + 1 for d in drafts]).tolist()
            n_rows = row_of.pop()
            if sample_states:
                smeta = self._sampling_metadata(sample_states, drafts)
                if sched.structured_req_ids:
                    first = {st.req_id: r for st, r in zip(sample_states, row_of)}
                    assert sched.structured_bitmask is not None
                    smeta.token_bitmask = torch.from_numpy(sched.structured_bitmask).to(dev)
                    smeta.bitmask_rows = torch.tensor(
                        [first[r] + j for r in sched.structured_req_ids
                         for j in range(len(spec_map.get(r, ())) + 1)], device=dev,
                    )  # fmt: skip
                if spec_map:
                    out, token_lists = self.sampler.verify(logits[:n_rows], smeta, drafts)
                else:
                    out = self.sampler(logits[:n_rows], smeta)
                    token_lists = [[t] for t in out.sampled.tolist()]
                for j, i in enumerate(sample_req_idx):
                    sampled_lists[i] = token_lists[j]
                if out.logprobs is not None:
                    logprobs_out = [None] * B
                    ids = out.logprob_token_ids.tolist()  # type: ignore[union-attr]
                    lps = out.logprobs.tolist()
                    ranks = out.sampled_ranks.tolist()  # type: ignore[union-attr]
                    for j, i in enumerate(sample_req_idx):
                        k = states[i].sampling_params.logprobs
                        if k is None:
                            continue
                        logprobs_out[i] = [
                            TokenLogprobs(
                                token_ids=ids[r][: k + 1],
                                logprobs=lps[r][: k + 1],
                                ranks=[ranks[r], *range(1, k + 1)],
                            )
                            for r in range(row_of[j], row_of[j] + len(token_lists[j]))
                        ]
                if self.drafter is not None:
                    draft_out = self.drafter.propose(
                        batch, [(states[i], sampled_lists[i], int(spec_lens[i]))
                                for i in sample_req_idx], sched.draft_propose,
                    )  # fmt: skip
            logits = logits[n_rows:]
            for i, first_row, n, first_pos in prompt_lp_spans:
                s = states[i]
                first_row -= n_rows
                targets = batch.tokens(s.row, first_pos + 1, first_pos + 1 + n)
                prompt_logprobs[s.req_id] = self._logprobs_of(
                    logits[first_row : first_row + n],
                    targets,
                    s.sampling_params.prompt_logprobs or 0,
                )
        batch.num_computed[rows] = seq_lens
        return ModelRunnerOutput(
            req_ids=req_ids,
            sampled_token_ids=sampled_lists,
            logprobs=logprobs_out,
            prompt_logprobs=prompt_logprobs,
            draft_token_ids=draft_out,
            pooled=pooled,
        )

    def _pool(
        self,
        hidden: torch.Tensor,
        states: list[RowState],
        starts: np.ndarray,
        ends: np.ndarray,
        seq_lens: np.ndarray,
    ) -> dict[str, list[float]]:
        """Embedding requests: add this chunk's final hidden states to the request's sum
        (mean pooling), and once its prompt is complete return the pooled, truncated
        (dimensions) and normalized vector."""
        out: dict[str, list[float]] = {}
        for s, a, b, n in zip(states, starts.tolist(), ends.tolist(), seq_lens.tolist()):
            pp = s.sampling_params.pooling
            assert pp is not None
            if pp.pooling_type == "mean":
                part = hidden[a:b].double().sum(dim=0)
                s.pool_sum = part if s.pool_sum is None else s.pool_sum + part
            if n < s.num_prompt_tokens:
                continue
            if pp.pooling_type == "mean":
                assert s.pool_sum is not None
                vec = (s.pool_sum / s.num_prompt_tokens).float()
            else:
                vec = hidden[b - 1].float()
            if pp.dimensions is not None:
                vec = vec[: pp.dimensions]
            if pp.normalize:
                vec = torch.nn.functional.normalize(vec, dim=0)
            out[s.req_id] = vec.cpu().tolist()
        return out

    def _lora_groups(
        self, states: list[RowState], rows: np.ndarray, q_lens: np.ndarray
    ) -> list[Group] | None:
        """The step's tokens per adapter (activating the adapters); None when every
        request runs the base model."""
        lora_of_row = self.batch.lora_ids[rows]
        if not lora_of_row.any():
            return None
        assert self.lora_manager is not None
        ids = [int(i) for i in np.unique(lora_of_row) if i]
        self.lora_manager.prepare(
            {s.lora_request.lora_int_id: s.lora_request for s in states if s.lora_request}
        )
        per_token = np.repeat(lora_of_row, q_lens)
        groups: list[Group] = []
        for lora_id in ids:
            idx = np.flatnonzero(per_token == lora_id)
            first, last = int(idx[0]), int(idx[-1])
            rows64 = torch.from_numpy(idx.astype(np.int64))
            if last - first + 1 == len(idx):
                groups.append((lora_id, slice(first, last + 1), rows64))
            else:
                groups.append((lora_id, rows64.to(self.device), rows64))
        return groups

    def remove_lora(self, lora_id: int) -> bool:
        return self.lora_manager.remove(lora_id) if self.lora_manager is not None else False

    @staticmethod
    def _logprobs_of(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprobs]:
        lp = logits.float().log_softmax(dim=-1)
        tgt = torch.as_tensor(targets, device=lp.device)[:, None]
        chosen = lp.gather(1, tgt)
        ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
        chosen_l = chosen[:, 0].tolist()
        if k > 0:
            top = lp.topk(k, dim=-1)
            top_ids, top_lps = top.indices.tolist(), top.values.tolist()
        else:
            top_ids = top_lps = [[] for _ in targets]
        return [
            TokenLogprobs(
                [t, *top_ids[j]], [chosen_l[j], *top_lps[j]], [ranks[j], *range(1, k + 1)]
            )
            for j, t in enumerate(targets)
        ]

    def _sampling_metadata(
        self, states: list[RowState], drafts: list[list[int]]
    ) -> SamplingMetadata:
        """Tensors gathered from the batch's per-row arrays; the rare per-request parts
        (seeds, logit bias, penalties' token counts, min_tokens) from the row states.

        A request verifying proposals gets 1 + len(drafts) rows: row j as if drafts[:j]
        had been generated (its penalties count them, its seed and min_tokens step past
        them), so each row's distribution is the one ordinary decoding would sample."""
        dev = self.device
        b = self.batch
        counts = np.fromiter((len(d) + 1 for d in drafts), dtype=np.int64, count=len(drafts))
        rows = np.repeat(np.fromiter((s.row for s in states), dtype=np.int64), counts)
        # (state, offset j) per sampler row.
        vrows = [(s, j) for s, d in zip(states, drafts) for j in range(len(d) + 1)]
        temp = b.temperature[rows]
        all_greedy = bool((temp == 0).all())
        meta = SamplingMetadata(temperature=torch.from_numpy(temp).to(dev), all_greedy=all_greedy)
        if not all_greedy:
            top_k = b.top_k[rows]
            if (top_k < self.vocab_size).any():
                meta.top_k = torch.from_numpy(top_k).to(dev)
            top_p = b.top_p[rows]
            if (top_p < 1.0).any():
                meta.top_p = torch.from_numpy(top_p).to(dev)
            min_p = b.min_p[rows]
            if (min_p > 0).any():
                meta.min_p = torch.from_numpy(min_p).to(dev)
            for v, (s, j) in enumerate(vrows):
                p = s.sampling_params
                if p.seed is not None and p.temperature > 0:
                    step = int(b.num_tokens[s.row]) - s.num_prompt_tokens + j
                    meta.generators[v] = seeded_generator(p.seed, step, dev)
        pres, freq, rep = b.presence[rows], b.frequency[rows], b.repetition[rows]
        if (pres != 0).any() or (freq != 0).any() or (rep != 1).any():
            meta.presence_penalty = torch.from_numpy(pres).to(dev)
            meta.frequency_penalty = torch.from_numpy(freq).to(dev)
            meta.repetition_penalty = torch.from_numpy(rep).to(dev)
            meta.prompt_token_ids = [b.tokens(s.row, 0, s.num_prompt_tokens) for s, _ in vrows]
            # Proposals lie past num_tokens in the row (see execute_model).
            meta.output_token_ids = [
                b.tokens(s.row, s.num_prompt_tokens, int(b.num_tokens[s.row]) + j) for s, j in vrows
            ]  # fmt: skip
        asked: list[int] = []
        for v, (s, j) in enumerate(vrows):
            p = s.sampling_params
            if p.logit_bias:
                if meta.logit_bias is None:
                    meta.logit_bias = [None] * len(vrows)
                meta.logit_bias[v] = p.logit_bias
            generated = int(b.num_tokens[s.row]) - s.num_prompt_tokens + j
            if p.min_tokens and p.all_stop_token_ids and generated < p.min_tokens:
                meta.min_tokens_blocked.append((v, sorted(p.all_stop_token_ids)))
            if p.logprobs is not None and j == 0:
                asked.append(p.logprobs)
        meta.max_num_logprobs = max(asked) if asked else None
        return meta

    # ---- sleep mode ---------------------------------------------------------------------

    kv_asleep: bool = False
    """The KV tensors are freed (sleep); wake_up allocates them again from ``plan``."""
    weights_asleep: int = 0
    """0: the weights are in place; 1: moved to host memory (CUDA, level 1); 2: dropped."""

    def asleep_tags(self) -> list[str]:
        """What is asleep: "weights" and/or "kv_cache" (empty: awake)."""
        return [t for t, a in (("weights", self.weights_asleep), ("kv_cache", self.kv_asleep)) if a]

    def sleep(self, level: int = 1) -> dict[str, int]:
        """Free the KV cache (both levels: its contents are lost, so the scheduler resets
        its prefix cache) and, at level 2, drop the weights (the draft's too, and the
        LoRA adapters in memory: wake_up reads them again). On CUDA level 1 moves the
        weights to host memory; on CPU it keeps them where they are. Level 2 after level
        1 drops what level 1 kept. Returns the bytes freed; ``release_memory`` then makes
        them leave the process."""
        from pagellm.worker.sleep import DiscardedModel, check_sleep_level, tensor_bytes

        level = check_sleep_level(level)
        freed_kv = freed_weights = 0
        if not self.kv_asleep:
            freed_kv = tensor_bytes(t for c in self.kv_caches for t in c.tensors())
            self._bind_kv_cache([])
            if self.drafter is not None:
                layers = self.drafter.model.attention_layers()  # type: ignore[operator]
                freed_kv += tensor_bytes(t for layer in layers for t in layer.kv_cache.tensors())
                self.drafter.bind_kv_cache(
                    [LayerKVCache(torch.empty(0), torch.empty(0)) for _ in layers]
                )
            self.kv_asleep = True
        if level == 2 and self.weights_asleep < 2:
            freed_weights = self.weight_bytes
            # Everything that holds the model's modules goes with it: the LoRA slots are
            # attributes of its Linears (a fresh manager comes back with the weights).
            self.model = DiscardedModel()
            self.lora_manager = None
            self.drafter = None
            self.weights_asleep = 2
        elif self.device.type == "cuda" and self.weights_asleep == 0:
            freed_weights = self.weight_bytes
            self.model.to("cpu")  # parameters and buffers, in place: the modules stay
            if self.drafter is not None:
                self.drafter.model.to("cpu")
            self.weights_asleep = 1
        logger.info(
            "asleep (level %d): freed %.1f MB of KV cache and %.1f MB of weights",
            level, freed_kv / 1e6, freed_weights / 1e6,
        )  # fmt: skip
        return {"freed_kv_bytes": freed_kv, "freed_weight_bytes": freed_weights}

    def wake_up(self, tags: list[str] | tuple[str, ...] | None = None) -> dict[str, int]:
        """Restore what ``tags`` names ("weights", "kv_cache"; none: both): the weights
        moved back or reloaded from the checkpoint with the same loader, the KV tensors
        allocated again with the same plan (as many blocks: the scheduler's block ids
        stay valid). Idempotent. Returns the bytes restored."""
        from pagellm.worker.sleep import check_wake_tags, tensor_bytes

        woken = check_wake_tags(tags)
        restored_weights = restored_kv = 0
        if "weights" in woken and self.weights_asleep:
            self._wake_weights()
            restored_weights = self.weight_bytes
        if "kv_cache" in woken and self.kv_asleep:
            assert self.plan is not None
            if self.weights_asleep == 2:
                # No layers to bind yet: the weights bind these when they come back.
                mc = self.config.model
                self.kv_caches = allocate_kv_cache(
                    self.plan, mc.hf_config, self.config.cache.kv_cache_dtype, self.device,
                    None, self.local_kv_heads, self.local_slots,
                )  # fmt: skip
            else:
                self.allocate_kv_cache(self.plan)
            self.kv_asleep = False
            restored_kv = tensor_bytes(t for c in self.kv_caches for t in c.tensors())
        return {"restored_kv_bytes": restored_kv, "restored_weight_bytes": restored_weights}

    def _wake_weights(self) -> None:
        if self.weights_asleep == 1:
            self.model.to(self.device)
            if self.drafter is not None:
                self.drafter.model.to(self.device)
            self.weights_asleep = 0
            return
        mc = self.config.model
        try:
            model = self._build_model()
        except Exception as e:
            raise RuntimeError(f"cannot reload the weights from {mc.model_path}: {e}") from e
        self.model = model
        spec = self.config.speculative
        if spec is not None and spec.method == "draft_model":
            assert spec.draft is not None
            self.drafter = DraftModel(self, spec.draft)
        if self.config.lora is not None:
            lc = self.config.lora
            self.lora_manager = LoRAManager(
                self.model, mc.hf_config, lc.max_loras, lc.max_cpu_loras, lc.max_lora_rank,
                self.dtype, self.device,
            )  # fmt: skip
        self.weights_asleep = 0
        if not self.kv_asleep:  # the KV cache woke first (wake_up(tags=["kv_cache"]))
            assert self.plan is not None
            self._bind_kv_cache(self.kv_caches)
            if self.drafter is not None:
                dc = self.drafter.hf_config
                kv_dtype = self.config.cache.kv_cache_dtype
                caches = allocate_kv_cache(
                    self.plan, dc, kv_dtype, self.device, dc.num_hidden_layers
                )
                self.drafter.bind_kv_cache(caches)
