"""A draft model that proposes tokens for the target to verify (speculative decoding).

The draft is a second, smaller (or more coarsely quantized) network with the target's
tokenizer. It lives in the worker next to the target and keeps its own paged KV: a
tensor per layer with as many blocks as the target's, addressed by the same block
table, so the scheduler's allocation (with ``num_lookahead`` slots for the draft's
writes past the verified tokens) covers both.

After a step's verification, for each request that sampled:

1. its draft KV catches up: the positions it lacks (the whole prompt the first time,
   usually one or two tokens later) run through the draft in one pass, whose last row
   gives the first proposal;
2. k - 1 more single-token passes give the rest. Proposals are greedy (point masses),
   which the target's rejection test keeps exact (Sampler.verify).

Per row the batch keeps ``draft_done`` (positions whose draft KV matches the request's
tokens) and ``draft_ahead`` (proposals whose KV was written past them): when the target
accepts n proposals, min(n, draft_ahead) of those positions are already right.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from pagellm.config import ModelConfig
from pagellm.layers.attention import LayerKVCache, get_attention_backend, set_forward_context
from pagellm.lora.layers import set_lora_groups
from pagellm.models.llama import head_dim_of
from pagellm.models.loader import build_model, model_weight_bytes

if TYPE_CHECKING:
    from pagellm.worker.input_batch import InputBatch, RowState
    from pagellm.worker.model_runner import ModelRunner


class DraftModel:
    def __init__(self, runner: ModelRunner, mc: ModelConfig) -> None:
        self.runner = runner
        self.hf_config = mc.hf_config
        self.model = build_model(
            mc.model_path, mc.hf_config, mc.architecture, runner.dtype, runner.device,
            runner.native_lib, mc.quantization, runner.quant_lib,
        )  # fmt: skip
        self.weight_bytes = model_weight_bytes(self.model)
        cfg = runner.config
        self.backend = get_attention_backend(
            cfg.device.attention_backend, runner.device, runner.dtype, head_dim_of(mc.hf_config),
            runner.native_lib, cfg.cache.kv_cache_dtype,
        )  # fmt: skip
        self.max_model_len = cfg.model.max_model_len
        self.block_size = cfg.cache.block_size

    def bind_kv_cache(self, caches: list[LayerKVCache]) -> None:
        for layer, cache in zip(self.model.attention_layers(), caches):  # type: ignore[operator]
            layer.bind(cache, self.backend)

    def propose(
        self,
        batch: InputBatch,
        sampled: list[tuple[RowState, list[int], int]],
        want: dict[str, int],
    ) -> dict[str, list[int]]:
        """Proposals for the requests in ``want`` (request id -> most tokens), given this
        step's (row state, tokens it produced, proposals it verified) per sampled request."""
        items = []  # (req id, row, first position to compute, sequence length, k)
        for state, tokens, num_verified in sampled:
            row = state.row
            accepted = len(tokens) - 1 if num_verified else 0
            batch.draft_done[row] += min(accepted, int(batch.draft_ahead[row]))
            batch.draft_ahead[row] = 0
            k = want.get(state.req_id, 0)
            if not k or not tokens:
                continue
            n = int(batch.num_tokens[row])
            seq_len = n + len(tokens)
            k = min(k, self.max_model_len - seq_len)
            if k <= 0:
                continue
            # Scratch past num_tokens, as for verified proposals: the scheduler sends the
            # same tokens as the request's own next step.
            batch.token_ids[row, n:seq_len] = tokens
            items.append((state.req_id, row, int(batch.draft_done[row]), seq_len, k))
        if not items:
            return {}
        rows = np.array([it[1] for it in items], dtype=np.int64)
        starts = np.array([it[2] for it in items], dtype=np.int64)
        ends = np.array([it[3] for it in items], dtype=np.int64)
        ks = [it[4] for it in items]
        q_lens = ends - starts
        positions = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])
        ids = batch.token_ids[np.repeat(rows, q_lens), positions]
        last = self._forward(batch, rows, starts, q_lens, positions, ids)
        proposals = [[t] for t in last]
        batch.draft_done[rows] = ends
        for step in range(1, max(ks)):
            active = [j for j, k in enumerate(ks) if k > step]
            sel = np.array(active, dtype=np.int64)
            pos = ends[sel] + step - 1
            ids = np.array([proposals[j][-1] for j in active], dtype=np.int64)
            ones = np.ones(len(active), dtype=np.int64)
            for j, t in zip(active, self._forward(batch, rows[sel], pos, ones, pos, ids)):
                proposals[j].append(t)
        for _, row, _, _, k in items:
            batch.draft_ahead[row] = k - 1
        return {it[0]: p for it, p in zip(items, proposals)}

    def _forward(
        self,
        batch: InputBatch,
        rows: np.ndarray,
        starts: np.ndarray,
        q_lens: np.ndarray,
        positions: np.ndarray,
        input_ids: np.ndarray,
    ) -> list[int]:
        """One draft pass; the greedy next token after each request's last row."""
        bs = self.block_size
        qsl = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        seq_lens = starts + q_lens
        max_blocks = int(batch.num_blocks[rows].max())
        # The target's group 0 keeps the whole length (full-attention groups come first,
        # and a target whose every layer slides takes no draft).
        block_tables = batch.block_table[0, rows, :max_blocks]
        batch_row = np.repeat(np.arange(len(rows)), q_lens)
        slot_mapping = (
            block_tables[batch_row, positions // bs].astype(np.int64) * bs + positions % bs
        )
        meta = self.runner.build_metadata(qsl, seq_lens, block_tables, slot_mapping, self.backend)
        dev = self.runner.device
        with set_forward_context(meta), set_lora_groups(None, None):
            hidden = self.model(
                torch.from_numpy(np.ascontiguousarray(input_ids)).to(dev),
                torch.from_numpy(np.ascontiguousarray(positions)).to(dev),
            )
        last = torch.from_numpy(qsl[1:] - 1).to(dev)
        logits = self.model.compute_logits(hidden.index_select(0, last))  # type: ignore[operator]
        return logits.argmax(dim=-1).tolist()  # type: ignore[no-any-return]
