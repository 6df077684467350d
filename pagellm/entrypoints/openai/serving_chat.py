"""POST /v1/chat/completions: the model's chat template, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

from pagellm.entrypoints.openai.protocol import (
    UNSUPPORTED_CHAT_FIELDS,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
)
from pagellm.entrypoints.openai.serving_base import (
    SSE_DONE,
    APIError,
    OpenAIServing,
    sse,
    stream_error,
)
from pagellm.outputs import CompletionOutput, Logprob
from pagellm.sampling_params import RequestOutputKind, SamplingParams
from pagellm.utils import random_uuid


class OpenAIServingChat(OpenAIServing):
    def render_prompt(self, req: ChatCompletionRequest) -> str:
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        if not messages:
            raise APIError.bad_request("messages must not be empty", "messages")
        add_gen = req.add_generation_prompt and not req.continue_final_message
        kwargs: dict[str, Any] = dict(req.chat_template_kwargs or {})
        if req.continue_final_message:
            kwargs["continue_final_message"] = True
        try:
            return self.engine.input_processor.apply_chat_template(
                messages, add_gen, req.chat_template, **kwargs
            )
        except ValueError as e:
            raise APIError.bad_request(str(e), "messages") from None

    def _prepare(self, req: ChatCompletionRequest) -> tuple[str, str, list[int], SamplingParams]:
        for name in UNSUPPORTED_CHAT_FIELDS:
            value = getattr(req, name)
            if value:
                raise APIError.bad_request(f"{name} is not supported by this server", name)
        if req.tool_choice not in (None, "none"):
            raise APIError.bad_request("tool_choice is not supported by this server", "tool_choice")
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError.bad_request(
                f"response_format of type {req.response_format.type!r} is not supported yet",
                "response_format",
            )
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError.bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
            raise APIError.bad_request(
                f"top_logprobs must be in [0, 20], got {req.top_logprobs}", "top_logprobs"
            )
        model = self.check_model(req.model)
        text = self.render_prompt(req)
        _, ids = self.tokenize_prompt(text, add_special_tokens=False)
        wanted = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        max_tokens = self.resolve_max_tokens(len(ids), wanted, "messages")
        kind = RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        try:
            params = req.sampling_params(max_tokens, logprobs, kind)
        except ValueError as e:
            raise APIError.bad_request(str(e)) from None
        return model, text, ids, params

    async def create(
        self, req: ChatCompletionRequest, request_id: str | None = None
    ) -> ChatCompletionResponse | AsyncGenerator[str, None]:
        model, text, ids, params = self._prepare(req)
        request_id = request_id or f"chatcmpl-{random_uuid()}"
        prompt = {"prompt": text, "prompt_token_ids": ids, "cache_salt": req.cache_salt}
        (gen,) = self.admit([(prompt, params)], request_id, req.priority)
        created = int(time.time())
        if req.stream:
            return self._stream(req, request_id, model, created, gen)
        final = None
        try:
            async for out in gen:
                final = out
        except ValueError as e:
            raise APIError.bad_request(str(e)) from None
        assert final is not None
        choices = [
            ChatChoice(
                index=c.index,
                message=ChatMessageOut(content=c.text),
                logprobs=self._logprobs(c, req.top_logprobs or 0) if req.logprobs else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in final.outputs
        ]
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        return ChatCompletionResponse(
            id=request_id,
            created=created,
            model=model,
            choices=choices,
            usage=UsageInfo.of(
                len(final.prompt_token_ids), completion_tokens, final.num_cached_tokens
            ),
        )

    async def _stream(
        self, req: ChatCompletionRequest, request_id: str, model: str, created: int, gen: Any
    ) -> AsyncGenerator[str, None]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}

        def chunk(choice: ChatChunkChoice) -> str:
            return sse(
                ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice]),
                exclude,
            )

        # The role comes first, once per choice, as OpenAI sends it.
        for i in range(req.n):
            yield chunk(ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
        prompt_tokens = completion_tokens = cached = 0
        try:
            async for out in gen:
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    if c.text or c.token_ids:
                        yield chunk(
                            ChatChunkChoice(
                                index=c.index,
                                delta=DeltaMessage(content=c.text),
                                logprobs=self._logprobs(c, req.top_logprobs or 0)
                                if req.logprobs
                                else None,
                            )
                        )
                    if c.finish_reason is not None:
                        yield chunk(
                            ChatChunkChoice(
                                index=c.index,
                                delta=DeltaMessage(),
                                finish_reason=c.finish_reason,
                                stop_reason=c.stop_reason,
                            )
                        )
                if out.finished:
                    prompt_tokens = len(out.prompt_token_ids)
                    cached = out.num_cached_tokens
            if include_usage:
                usage = UsageInfo.of(prompt_tokens, completion_tokens, cached)
                yield sse(
                    ChatCompletionChunk(
                        id=request_id, created=created, model=model, choices=[], usage=usage
                    )
                )
        except Exception as e:  # the stream still ends properly
            yield stream_error(e)
        yield SSE_DONE

    def _logprobs(self, comp: CompletionOutput, top: int) -> ChatLogprobs:
        content = []
        for tok, entry in zip(comp.token_ids, comp.logprobs or []):
            chosen = entry[tok]
            content.append(
                ChatTokenLogprob(
                    token=_text(chosen),
                    logprob=chosen.logprob,
                    bytes=list(_text(chosen).encode()),
                    top_logprobs=[
                        TopLogprob(
                            token=_text(lp), logprob=lp.logprob, bytes=list(_text(lp).encode())
                        )
                        for _, lp in self.top_entries(entry, top)
                    ],
                )
            )
        return ChatLogprobs(content=content)


def _text(lp: Logprob) -> str:
    return lp.decoded_token or ""
