"""InputProcessor: prompt (text, token ids or chat messages) -> validated Request.

Everything a user can get wrong is checked here, before the request touches shared
state; the ValueError names the parameter (and both numbers for lengths).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from pagellm.config import LoRAConfig, ModelConfig
from pagellm.core.request import Request
from pagellm.lora.adapter import check_adapter
from pagellm.lora.request import LoRARequest
from pagellm.sampling_params import SamplingParams

PromptType = str | Sequence[int] | dict[str, Any]


class InputProcessor:
    def __init__(
        self, model_config: ModelConfig, tokenizer: Any, lora_config: LoRAConfig | None = None
    ) -> None:
        self.model_config = model_config
        self.lora_config = lora_config
        # Adapters already checked: id -> (path, its files' mtimes), so a request does not
        # read the directory again; one id must keep one path.
        self._loras: dict[int, tuple[str, tuple[float, ...]]] = {}
        self.tokenizer = tokenizer
        self.vocab_size = int(model_config.hf_config.vocab_size)
        self.max_model_len = model_config.max_model_len

    def tokenize(
        self, prompt: PromptType, add_special_tokens: bool = True
    ) -> tuple[str | None, list[int]]:
        """(prompt text or None, prompt token ids)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            return prompt, list(ids)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt and prompt["prompt_token_ids"] is not None:
                return prompt.get("prompt"), self.check_token_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize(prompt["prompt"], add_special_tokens)
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        return None, self.check_token_ids(prompt)

    def check_lora(self, lora: Any) -> None:
        """A LoRARequest is usable: LoRA is on, the adapter reads and fits the model."""
        if lora is None:
            return
        if not isinstance(lora, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora).__name__}")
        if self.lora_config is None:
            raise ValueError(
                "this engine was started without LoRA: pass enable_lora=True (--enable-lora)"
            )
        known = self._loras.get(lora.lora_int_id)
        if known is not None and known[0] != lora.lora_path:
            raise ValueError(
                f"lora_int_id {lora.lora_int_id} already names the adapter at {known[0]!r}, "
                f"not {lora.lora_path!r}; give each adapter its own id"
            )
        stamp = _dir_stamp(lora.lora_path)
        if known is not None and known[1] == stamp:
            return
        # Config and tensor shapes only: the engine process reads the weights.
        check_adapter(lora.lora_path, self.model_config.hf_config, self.lora_config.max_lora_rank)
        self._loras[lora.lora_int_id] = (lora.lora_path, stamp)

    def forget_lora(self, lora_id: int) -> None:
        self._loras.pop(lora_id, None)

    def check_token_ids(self, ids: Any) -> list[int]:
        try:
            out = [int(t) for t in ids]
        except (TypeError, ValueError):
            raise ValueError("prompt must be a string or a list of token ids") from None
        if any(isinstance(t, bool) for t in ids):
            raise ValueError("prompt token ids must be integers")
        bad = [t for t in out if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token id {bad[0]} is out of range for a vocabulary of {self.vocab_size}"
            )
        return out

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        template = chat_template or self.model_config.chat_template
        if template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                "the model has no chat template; pass one with --chat-template (or chat_template=)"
            )
        normalized = [_normalize_message(m) for m in messages]
        try:
            return str(
                self.tokenizer.apply_chat_template(
                    normalized,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                    chat_template=template,
                    **template_kwargs,
                )
            )
        except Exception as e:  # jinja errors from the template itself
            raise ValueError(f"the chat template failed on these messages: {e}") from e

    def process(
        self,
        req_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival_time: float | None = None,
        add_special_tokens: bool = True,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> tuple[Request, str | None]:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        self.check_lora(lora_request)
        text, ids = self.tokenize(prompt, add_special_tokens)
        if isinstance(prompt, dict) and prompt.get("cache_salt") is not None:
            cache_salt = str(prompt["cache_salt"])
        if not ids:
            raise ValueError("prompt must not be empty (it has no tokens)")
        n = len(ids)
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens but max_model_len is {self.max_model_len}; "
                "it must be shorter to leave room for at least one output token"
            )
        for name, ids_ in (
            ("logit_bias", params.logit_bias or {}),
            ("stop_token_ids", params.stop_token_ids or []),
        ):
            bad = [t for t in ids_ if t >= self.vocab_size]
            if bad:
                raise ValueError(
                    f"{name} token id {bad[0]} is out of range for a vocabulary of {self.vocab_size}"
                )
        params.update_from_eos(self.model_config.eos_token_ids)
        request = Request(
            req_id=req_id,
            prompt_token_ids=ids,
            sampling_params=params,
            eos_token_ids=self.model_config.eos_token_ids,
            max_model_len=self.max_model_len,
            arrival_time=time.time() if arrival_time is None else arrival_time,
            cache_salt=cache_salt,
            lora_request=lora_request,
        )
        return request, text


def _dir_stamp(path: str) -> tuple[float, ...]:
    """Modification times of an adapter directory's files (empty if it is unreadable)."""
    try:
        names = sorted(os.listdir(path))
        return tuple(os.path.getmtime(os.path.join(path, n)) for n in names)
    except OSError:
        return ()


def _normalize_message(message: Any) -> dict[str, Any]:
    """Chat message with text-part lists ([{"type": "text", "text": ...}]) joined to a string."""
    if not isinstance(message, dict) or "role" not in message:
        raise ValueError("each chat message must be an object with a 'role'")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                texts.append(part)
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(
                    f"message content part of type {kind!r} is not supported (text only)"
                )
        message = {**message, "content": "".join(texts)}
    elif content is None:
        message = {**message, "content": ""}
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        # OpenAI sends arguments as JSON text; chat templates expect the object.
        fixed = []
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                with contextlib.suppress(ValueError):  # not JSON: left as it is
                    fn = {**fn, "arguments": json.loads(fn["arguments"])}
                call = {**call, "function": fn}
            fixed.append(call)
        message = {**message, "tool_calls": fixed}
    return message
