"""Anthropic Messages API request schemas (pydantic).

Top-level fields are checked as Anthropic checks them: an unknown field is refused (400
naming it) and a wrong type is a 400. Content blocks are kept as dicts here and checked
one by one in the translation (``serving_messages``), so that a block pagellm cannot
serve (image, document, server tools) is refused with a message that says so. Fields
inside blocks that change nothing here (``cache_control``, ``citations``) are accepted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class AnthropicModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MessageParam(AnthropicModel):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class ToolParam(BaseModel):
    """A client tool. Extra keys (``cache_control``, ``strict``, ...) are accepted and
    ignored; a server tool (a ``type`` other than "custom") is refused in translation."""

    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class ToolChoiceParam(AnthropicModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingParam(AnthropicModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None
    display: str | None = None


class OutputFormatParam(AnthropicModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfigParam(AnthropicModel):
    effort: str | None = None
    """Accepted; changes nothing here."""
    format: OutputFormatParam | None = None
    """Structured output: the reply's text is JSON matching the schema."""


class CountTokensRequest(AnthropicModel):
    """POST /v1/messages/count_tokens: the prompt part of a Messages request."""

    model: str
    messages: list[MessageParam]
    system: str | list[dict[str, Any]] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: ThinkingParam | None = None
    output_config: OutputConfigParam | None = None
    cache_control: dict[str, Any] | None = None
    """Accepted; pagellm's prefix cache needs no markers."""


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    stream: bool = False
    # Accepted; they change nothing here.
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    speed: str | None = None
    inference_geo: str | None = None
