"""POST /v1/completions: one or several prompts, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import Any

from pagellm.entrypoints.openai.protocol import (
    UNSUPPORTED_COMPLETION_FIELDS,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from pagellm.entrypoints.openai.serving_base import (
    SSE_DONE,
    APIError,
    OpenAIServing,
    as_prompt_list,
    merge_async_iterators,
    sse,
    stream_error,
)
from pagellm.outputs import CompletionOutput, RequestOutput
from pagellm.sampling_params import RequestOutputKind, SamplingParams
from pagellm.utils import random_uuid


def _scoring(req: CompletionRequest) -> bool:
    """echo with max_tokens 0: the legacy way to score a text (the prompt's logprobs)."""
    return bool(req.echo) and req.max_tokens == 0


def _prompt_only(comp: CompletionOutput) -> CompletionOutput:
    """A scoring request's output: the one token the engine sampled is not part of it."""
    done = comp.finish_reason is not None
    return replace(
        comp,
        text="",
        token_ids=[],
        logprobs=[],
        cumulative_logprob=None,
        finish_reason="length" if done else None,
        stop_reason=None,
    )


class OpenAIServingCompletion(OpenAIServing):
    def _prepare(
        self, req: CompletionRequest
    ) -> tuple[str, list[tuple[str | None, list[int]]], list[SamplingParams]]:
        for name in UNSUPPORTED_COMPLETION_FIELDS:
            if getattr(req, name) is not None:
                raise APIError.bad_request(f"{name} is not supported by this server", name)
        model = self.check_model(req.model)
        prompts = as_prompt_list(req.prompt)
        if not prompts:
            raise APIError.bad_request("prompt must not be empty", "prompt")
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise APIError.bad_request(
                f"logprobs must be in [0, 20], got {req.logprobs}", "logprobs"
            )
        if req.max_tokens == 0 and not req.echo:
            raise APIError.bad_request(
                "max_tokens must be at least 1 (0 only with echo, to score the prompt)",
                "max_tokens",
            )
        kind = RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY
        tokenized = [self.tokenize_prompt(p, req.add_special_tokens) for p in prompts]
        params = []
        for _, ids in tokenized:
            # Scoring (echo, max_tokens 0): the engine samples one token, which is dropped.
            wanted = 1 if _scoring(req) else req.max_tokens
            max_tokens = self.resolve_max_tokens(len(ids), wanted)
            try:
                p = req.sampling_params(max_tokens, req.logprobs, kind)
                if req.echo and req.logprobs is not None and p.prompt_logprobs is None:
                    p.prompt_logprobs = req.logprobs
            except ValueError as e:
                raise APIError.bad_request(str(e)) from None
            params.append(p)
        return model, tokenized, params

    async def create(
        self, req: CompletionRequest, request_id: str | None = None
    ) -> CompletionResponse | AsyncGenerator[str, None]:
        model, tokenized, params = self._prepare(req)
        request_id = request_id or f"cmpl-{random_uuid()}"
        prompts = [
            ({"prompt": text, "prompt_token_ids": ids, "cache_salt": req.cache_salt}, p)
            for (text, ids), p in zip(tokenized, params)
        ]
        lora = self.resolve_model(model)[1]
        generators = await self.admit(prompts, f"{request_id}", req.priority, lora)
        model = getattr(generators[0], "model", None) or model  # a route's choice
        created = int(time.time())
        if req.stream:
            return self._stream(req, request_id, model, created, generators, tokenized)
        finals: list[RequestOutput | None] = [None] * len(generators)
        try:
            async for i, out in merge_async_iterators(*generators):
                finals[i] = out
        except ValueError as e:
            raise APIError.bad_request(str(e)) from None
        choices: list[CompletionChoice] = []
        prompt_tokens = completion_tokens = cached = 0
        from_cache = None
        for i, final in enumerate(finals):
            assert final is not None
            out = final
            prompt_tokens += len(out.prompt_token_ids)
            cached += out.num_cached_tokens
            from_cache = from_cache or out.extra.get("response_cache")
            for comp in out.outputs:
                if _scoring(req):
                    comp = _prompt_only(comp)
                completion_tokens += len(comp.token_ids)
                text = comp.text
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self._logprobs(comp, req.logprobs, out if req.echo else None)
                if req.echo:
                    text = self._prompt_text(tokenized[i][0], out) + text
                choices.append(
                    CompletionChoice(
                        index=i * req.n + comp.index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=comp.finish_reason,
                        stop_reason=comp.stop_reason,
                    )
                )
        return CompletionResponse(
            id=request_id,
            created=created,
            model=model,
            choices=choices,
            usage=UsageInfo.of(prompt_tokens, completion_tokens, cached, from_cache),
        )

    async def _stream(
        self,
        req: CompletionRequest,
        request_id: str,
        model: str,
        created: int,
        generators: list[Any],
        tokenized: list[tuple[str | None, list[int]]],
    ) -> AsyncGenerator[str, None]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}
        prompt_tokens = completion_tokens = cached = 0
        from_cache = None
        echoed: set[int] = set()
        offsets: dict[int, int] = {}
        try:
            async for i, out in merge_async_iterators(*generators):
                for comp in out.outputs:
                    if _scoring(req):
                        comp = _prompt_only(comp)
                    index = i * req.n + comp.index
                    text = comp.text
                    if req.echo and index not in echoed:
                        echoed.add(index)
                        text = self._prompt_text(tokenized[i][0], out) + text
                    logprobs = None
                    if req.logprobs is not None:
                        first = req.echo and offsets.get(index) is None
                        logprobs = self._logprobs(
                            comp, req.logprobs, out if first else None, offsets.get(index, 0)
                        )
                        offsets[index] = offsets.get(index, 0) + len(text)
                    completion_tokens += len(comp.token_ids)
                    if not text and comp.finish_reason is None and not comp.token_ids:
                        continue
                    chunk = CompletionResponse(
                        id=request_id,
                        created=created,
                        model=model,
                        choices=[
                            CompletionChoice(
                                index=index,
                                text=text,
                                logprobs=logprobs,
                                finish_reason=comp.finish_reason,
                                stop_reason=comp.stop_reason,
                            )
                        ],
                    )
                    yield sse(chunk, exclude)
                if out.finished:
                    prompt_tokens += len(out.prompt_token_ids)
                    cached += out.num_cached_tokens
                    from_cache = from_cache or out.extra.get("response_cache")
            if include_usage:
                final = CompletionResponse(
                    id=request_id, created=created, model=model, choices=[],
                    usage=UsageInfo.of(prompt_tokens, completion_tokens, cached, from_cache),
                )  # fmt: skip
                yield sse(final)
        except Exception as e:  # the stream still ends properly
            yield stream_error(e)
        yield SSE_DONE

    def _prompt_text(self, text: str | None, out: RequestOutput) -> str:
        return text if text is not None else str(self.tokenizer.decode(out.prompt_token_ids))

    def _logprobs(
        self,
        comp: CompletionOutput,
        num: int,
        echo_of: RequestOutput | None,
        offset: int = 0,
    ) -> CompletionLogprobs:
        out = CompletionLogprobs()
        entries: list[tuple[int, dict[int, Any] | None]] = []
        if echo_of is not None and echo_of.prompt_logprobs is not None:
            entries += list(zip(echo_of.prompt_token_ids, echo_of.prompt_logprobs))
        entries += list(zip(comp.token_ids, comp.logprobs or []))
        for tok, entry in entries:
            text = self.tokenizer.decode([tok])
            out.tokens.append(text)
            out.text_offset.append(offset)
            offset += len(text)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(entry[tok].logprob)
            out.top_logprobs.append(
                {lp.decoded_token or "": lp.logprob for _, lp in self.top_entries(entry, num)}
            )
        return out
