"""POST /v1/embeddings: a string, a list of strings, or token ids, pooled by the engine."""

from __future__ import annotations

import base64
import time

import numpy as np

from pagellm.entrypoints.openai.protocol import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)
from pagellm.entrypoints.openai.serving_base import (
    APIError,
    OpenAIServing,
    as_prompt_list,
    merge_async_iterators,
)
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import PoolingParams, RequestOutputKind, SamplingParams
from pagellm.utils import random_uuid


def encode_base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the float32 values, little-endian."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


class OpenAIServingEmbedding(OpenAIServing):
    async def create(
        self, req: EmbeddingRequest, request_id: str | None = None
    ) -> EmbeddingResponse:
        model, lora = self.resolve_model(req.model)
        inputs = as_prompt_list(req.input)
        if not inputs:
            raise APIError.bad_request("input must not be empty", "input")
        if any(isinstance(x, str) and not x for x in inputs):
            raise APIError.bad_request("input must not contain empty strings", "input")
        hidden = int(self.engine.config.model.hf_config.hidden_size)
        if req.dimensions is not None and not 1 <= req.dimensions <= hidden:
            raise APIError.bad_request(
                f"dimensions must be between 1 and the model's {hidden}, got {req.dimensions}",
                "dimensions",
            )
        pooling = PoolingParams(
            dimensions=req.dimensions, pooling_type=self.engine.config.model.pooling
        )
        params = SamplingParams(
            max_tokens=1, temperature=0.0, pooling=pooling,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )  # fmt: skip
        prompts = []
        for x in inputs:
            text, ids = self.tokenize_prompt(x, req.add_special_tokens)
            self.resolve_max_tokens(len(ids), 1, "input")
            prompts.append(({"prompt": text, "prompt_token_ids": ids}, params.clone()))
        request_id = request_id or f"embd-{random_uuid()}"
        generators = await self.admit(prompts, request_id, req.priority, lora)
        finals: list[RequestOutput | None] = [None] * len(generators)
        async for i, out in merge_async_iterators(*generators):
            finals[i] = out
        data = []
        tokens = 0
        for i, out in enumerate(finals):
            assert out is not None
            if out.embedding is None:
                raise APIError(500, "the engine returned no embedding", "server_error")
            tokens += len(out.prompt_token_ids)
            vec: list[float] | str = (
                encode_base64(out.embedding) if req.encoding_format == "base64" else out.embedding
            )
            data.append(EmbeddingData(index=i, embedding=vec))
        return EmbeddingResponse(
            id=request_id, created=int(time.time()), model=model, data=data,
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )  # fmt: skip
