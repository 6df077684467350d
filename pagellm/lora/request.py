"""The adapter a request runs with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """Run a request with the PEFT adapter at ``lora_path``.

    ``lora_int_id`` identifies the adapter inside the engine (a positive integer, one per
    distinct adapter); ``lora_name`` is what users call it (the server's ``model``).
    """

    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")
        if not self.lora_name:
            raise ValueError("lora_name must not be empty")

    @property
    def cache_key(self) -> str:
        """What separates this adapter's KV blocks from everyone else's."""
        return f"lora:{self.lora_int_id}:{self.lora_name}:{self.lora_path}"
