"""The persistent input batch: the worker's copy of every scheduled request, kept in
preallocated arrays and updated from the scheduler's deltas.

Each request the worker knows owns one row until it finishes or is preempted:

    row r:  token_ids[r, :num_tokens[r]]        prompt then output tokens
            block_table[g, r, :num_blocks[r]]   its KV blocks in KV cache group g, in
                                                position order (every group as many)
            temperature[r], top_k[r], ...       its sampling parameters, written once

A step gathers the rows it schedules with numpy indexing: no Python loop over a
request's tokens or blocks, and sampling parameters are not rebuilt from objects.
Arrays grow (doubling) when more requests or longer ones arrive than planned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pagellm.lora.request import LoRARequest
from pagellm.sampling_params import SamplingParams


@dataclass
class RowState:
    """What the worker keeps per request besides its arrays."""

    req_id: str
    row: int
    num_prompt_tokens: int
    sampling_params: SamplingParams
    prompt_logprobs_done: bool = False
    lora_request: LoRARequest | None = None
    pool_sum: Any = None
    """Embedding requests with mean pooling: the sum of the hidden states computed so far."""


class InputBatch:
    def __init__(
        self,
        max_num_reqs: int,
        max_model_len: int,
        block_size: int,
        vocab_size: int,
        num_kv_groups: int = 1,
    ) -> None:
        self.block_size = block_size
        self.vocab_size = vocab_size
        self._max_len = max_model_len
        n = max(max_num_reqs, 1)
        self.token_ids = np.zeros((n, max_model_len), dtype=np.int64)
        self.num_tokens = np.zeros(n, dtype=np.int64)
        self.num_computed = np.zeros(n, dtype=np.int64)
        blocks = -(-max_model_len // block_size)
        self.block_table = np.zeros((num_kv_groups, n, blocks), dtype=np.int32)
        self.num_blocks = np.zeros(n, dtype=np.int64)
        # Sampling parameters, one per row (what SamplingMetadata needs as tensors).
        self.temperature = np.zeros(n, dtype=np.float32)
        self.top_k = np.zeros(n, dtype=np.int64)
        self.top_p = np.ones(n, dtype=np.float32)
        self.min_p = np.zeros(n, dtype=np.float32)
        self.presence = np.zeros(n, dtype=np.float32)
        self.frequency = np.zeros(n, dtype=np.float32)
        self.repetition = np.ones(n, dtype=np.float32)
        self.lora_ids = np.zeros(n, dtype=np.int64)  # 0: the base model
        # A draft model's KV per row (speculative decoding): positions it holds for the
        # row's tokens, and how many proposals' KV it wrote past them last time.
        self.draft_done = np.zeros(n, dtype=np.int64)
        self.draft_ahead = np.zeros(n, dtype=np.int64)
        self.requests: dict[str, RowState] = {}
        self._free = list(range(n - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.requests)

    def _grow_rows(self) -> None:
        old = self.token_ids.shape[0]
        new = old * 2
        grown = np.zeros((new, self.token_ids.shape[1]), dtype=self.token_ids.dtype)
        grown[:old] = self.token_ids
        self.token_ids = grown
        table = self.block_table
        grown_table = np.zeros((table.shape[0], new, table.shape[2]), dtype=table.dtype)
        grown_table[:, :old] = table
        self.block_table = grown_table
        for name, fill in (("num_tokens", 0), ("num_computed", 0), ("num_blocks", 0),
                           ("temperature", 0), ("top_k", 0), ("top_p", 1), ("min_p", 0),
                           ("presence", 0), ("frequency", 0), ("repetition", 1),
                           ("lora_ids", 0), ("draft_done", 0), ("draft_ahead", 0)):  # fmt: skip
            arr = getattr(self, name)
            grown = np.full(new, fill, dtype=arr.dtype)
            grown[:old] = arr
            setattr(self, name, grown)
        self._free.extend(range(new - 1, old - 1, -1))

    def _ensure_blocks(self, count: int) -> None:
        groups, rows, have = self.block_table.shape
        if count > have:
            grown = np.zeros((groups, rows, count), dtype=np.int32)
            grown[:, :, :have] = self.block_table
            self.block_table = grown

    def add(
        self,
        req_id: str,
        token_ids: list[int],
        num_prompt_tokens: int,
        params: SamplingParams,
        block_ids: list[list[int]],
        num_computed: int,
        prompt_logprobs_done: bool,
        lora_request: LoRARequest | None = None,
    ) -> RowState:
        if not self._free:
            self._grow_rows()
        row = self._free.pop()
        n = len(token_ids)
        if n > self.token_ids.shape[1]:  # cannot happen within max_model_len; stay safe
            grown = np.zeros((self.token_ids.shape[0], n), dtype=np.int64)
            grown[:, : self.token_ids.shape[1]] = self.token_ids
            self.token_ids = grown
        self.token_ids[row, :n] = token_ids
        self.num_tokens[row] = n
        self.num_computed[row] = num_computed
        self._set_blocks(row, 0, block_ids)
        p = params
        self.temperature[row] = p.temperature
        self.top_k[row] = p.top_k if p.top_k != -1 else self.vocab_size
        self.top_p[row] = p.top_p
        self.min_p[row] = p.min_p
        self.presence[row] = p.presence_penalty
        self.frequency[row] = p.frequency_penalty
        self.repetition[row] = p.repetition_penalty
        self.lora_ids[row] = lora_request.lora_int_id if lora_request is not None else 0
        self.draft_done[row] = 0
        self.draft_ahead[row] = 0
        state = RowState(req_id, row, num_prompt_tokens, params, prompt_logprobs_done, lora_request)
        self.requests[req_id] = state
        return state

    def remove(self, req_id: str) -> None:
        state = self.requests.pop(req_id, None)
        if state is not None:
            self._free.append(state.row)

    def append_blocks(self, row: int, block_ids: list[list[int]]) -> None:
        """Append each KV cache group's new blocks (as many per group)."""
        self._set_blocks(row, int(self.num_blocks[row]), block_ids)

    def _set_blocks(self, row: int, start: int, block_ids: list[list[int]]) -> None:
        count = len(block_ids[0]) if block_ids else 0
        assert len(block_ids) in (0, self.block_table.shape[0])
        assert all(len(ids) == count for ids in block_ids), "KV groups appended unequally"
        end = start + count
        self._ensure_blocks(end)
        for g, ids in enumerate(block_ids):
            self.block_table[g, row, start:end] = ids
        self.num_blocks[row] = end

    def append_tokens(self, row: int, token_ids: list[int]) -> None:
        start = int(self.num_tokens[row])
        self.token_ids[row, start : start + len(token_ids)] = token_ids
        self.num_tokens[row] = start + len(token_ids)

    def tokens(self, row: int, start: int = 0, end: int | None = None) -> list[int]:
        stop = int(self.num_tokens[row]) if end is None else end
        return self.token_ids[row, start:stop].tolist()  # type: ignore[no-any-return]
