"""The Responses API request (``POST /v1/responses``) as pydantic validates it.

Unknown fields are refused (400) as everywhere in the API; fields OpenAI defines that
pagellm does not implement are accepted here and refused by name in
``serving_responses`` (so that the message says why), never silently ignored.
"""

from __future__ import annotations

from typing import Any

from pagellm.entrypoints.openai.protocol import OpenAIModel


class ResponsesRequest(OpenAIModel):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    truncation: str | None = None
    # OpenAI fields refused when set (see serving_responses.UNSUPPORTED).
    include: list[str] | None = None
    background: bool | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    prompt: dict[str, Any] | None = None
    conversation: str | dict[str, Any] | None = None
    context_management: list[dict[str, Any]] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    # pagellm's sampling extras (the names chat completions takes).
    seed: int | None = None
    stop: str | list[str] | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    priority: int | None = None
    cache_salt: str | None = None
