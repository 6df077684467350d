"""The offline API: ``LLM(model=...).generate(prompts, params)`` and ``.chat(messages)``."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from pagellm.engine.arg_utils import EngineArgs
from pagellm.engine.llm_engine import LLMEngine
from pagellm.lora.request import LoRARequest
from pagellm.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from pagellm.sampling_params import PoolingParams, RequestOutputKind, SamplingParams

Prompt = str | Sequence[int] | dict[str, Any]


class LLM:
    """Generate text for batches of prompts with continuous batching.

    Keyword arguments are EngineArgs fields (model, dtype, max_model_len,
    kv_cache_memory, block_size, max_num_seqs, max_num_batched_tokens, seed, tokenizer,
    ...); an unknown one raises ValueError.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine_args = EngineArgs(model=model, **kwargs)
        if self.engine_args.data_parallel_size != 1:
            raise ValueError(
                f"data_parallel_size={self.engine_args.data_parallel_size}: the offline LLM "
                "runs one engine; for replicas use `pagellm serve -dp N`, `pagellm run-batch "
                "-dp N` or pagellm.integrations.ray_data (one engine per Ray actor)"
            )
        self.engine = LLMEngine.from_engine_args(self.engine_args)
        self._counter = itertools.count()

    def embed(
        self,
        prompts: Prompt | Sequence[Prompt],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One normalized vector per prompt: the final hidden states pooled as the
        engine's ``pooling`` says (last token or mean), optionally cut to
        ``pooling_params.dimensions``."""
        pp = pooling_params or PoolingParams()
        pp = dataclasses.replace(pp, pooling_type=self.engine.config.model.pooling)
        hidden = int(self.engine.config.model.hf_config.hidden_size)
        if pp.dimensions is not None and pp.dimensions > hidden:
            raise ValueError(
                f"dimensions must be at most the model's {hidden}, got {pp.dimensions}"
            )
        params = SamplingParams(max_tokens=1, temperature=0.0, pooling=pp)
        outs = self._run(_as_batch(prompts), params, use_tqdm, True, lora_request)
        return [
            EmbeddingRequestOutput(
                o.request_id, o.prompt_token_ids, EmbeddingOutput(o.embedding or []), o.finished
            )
            for o in outs
        ]

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def sleep(self, level: int = 1) -> None:
        """Free memory between batches (vLLM's sleep mode, always on here): level 1 the
        KV cache (on GPU the weights also move to host memory), level 2 the weights too
        (``wake_up`` reads them from the checkpoint again). generate() raises until
        ``wake_up``."""
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore what sleep freed ("weights", "kv_cache"; none: both)."""
        self.engine.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.engine.is_sleeping()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Outputs in the order of the prompts. A single string or a flat list of token
        ids counts as one prompt; a list of them as a batch. ``lora_request``: one adapter
        for every prompt, or one per prompt (None: the base model); needs enable_lora."""
        batch = _as_batch(prompts)
        return self._run(batch, sampling_params, use_tqdm, True, lora_request)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them."""
        if not messages:
            raise ValueError("messages must not be empty")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        texts: list[Prompt] = []
        for conv in conversations:
            if not isinstance(conv, list) or not conv:
                raise ValueError("each conversation must be a non-empty list of messages")
            texts.append(
                self.engine.input_processor.apply_chat_template(
                    conv, add_generation_prompt, chat_template, **template_kwargs
                )
            )
        # The template already holds any BOS token.
        return self._run(texts, sampling_params, use_tqdm, False, lora_request)

    def _run(
        self,
        prompts: list[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
        add_special_tokens: bool,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompts)} prompts"
                )
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras: list[LoRARequest | None] = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"got {len(loras)} lora requests for {len(prompts)} prompts")
        order: list[str] = []
        staged = []
        for prompt, params, lora in zip(prompts, params_list, loras):
            p = params.clone()
            p.output_kind = RequestOutputKind.FINAL_ONLY
            req_id = str(next(self._counter))
            staged.append((req_id, prompt, p, lora))
            order.append(req_id)
        # A bad prompt raises ValueError; the ones queued before it are withdrawn.
        added: list[str] = []
        try:
            for req_id, prompt, p, lora in staged:
                self.engine.add_request(
                    req_id, prompt, p, add_special_tokens=add_special_tokens, lora_request=lora
                )
                added.append(req_id)
        except Exception:
            self.engine.abort_request(added)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(
            total=len(order), desc="Processed prompts", disable=not use_tqdm or len(order) < 2
        )
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        except BaseException:
            self.engine.abort_request([r for r in order if r not in results])
            raise
        finally:
            bar.close()
        return [results[r] for r in order]


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    items: list[Any] = list(prompts)
    if not items:
        raise ValueError("prompts must not be empty")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in items):
        return [items]  # one prompt given as token ids
    return items
