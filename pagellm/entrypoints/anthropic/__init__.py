"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens), served by
translating to and from the chat completions layer."""
