"""The names the server answers to: the base model and its LoRA adapters.

A request's ``model`` picks the base model or an adapter by name; ``/v1/models`` lists
both, each adapter with the base as ``parent`` and its directory as ``root``. Adapters
come from ``--lora-modules`` at start-up and, with ``--allow-runtime-lora``, from
``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (vLLM's bodies).

Unloading an adapter that is in use: its name disappears at once (new requests get 404),
the requests already running finish normally, and the call returns once they have and
the engine has dropped the weights.

The serving policy's routes (pagellm.policy.routing) are names too: ``routes`` returns
them, and such a name resolves to a RouteRequest that the policy replaces by the model
it picks at admission.
"""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING, Any

from pagellm.entrypoints.openai.protocol import ModelCard
from pagellm.entrypoints.openai.serving_base import APIError
from pagellm.lora.request import LoRARequest
from pagellm.policy.routing import RouteRequest

if TYPE_CHECKING:
    from pagellm.engine.async_llm import AsyncLLM


def parse_lora_modules(values: list[str] | None) -> list[tuple[str, str]]:
    """--lora-modules entries: ``name=path`` or ``{"name": ..., "path": ...}``."""
    out = []
    for value in values or []:
        value = value.strip()
        if value.startswith("{"):
            try:
                obj = json.loads(value)
                name, path = str(obj["name"]), str(obj["path"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f'--lora-modules {value!r}: expected {{"name", "path"}} ({e})'
                ) from None
        else:
            name, sep, path = value.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules {value!r}: expected name=path")
        out.append((name, path))
    return out


class ServingModels:
    def __init__(self, engine: AsyncLLM, base_names: list[str]) -> None:
        self.engine = engine
        self.base_names = list(base_names)
        self.adapters: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)
        self.routes: Any = lambda: {}  # the policy's routes: name -> RouteConfig

    @property
    def base(self) -> str:
        return self.base_names[0]

    def resolve(self, name: str | None) -> tuple[str, Any]:
        """(the name to report, the adapter to run: a LoRARequest, None for the base
        model, or a RouteRequest); 404 for a name nobody serves."""
        if name is None or name == "":
            return self.base, None
        if name in self.base_names:
            return name, None
        lora: Any = self.adapters.get(name)
        if lora is None and name in self.routes():
            lora = RouteRequest(name)
        if lora is None:
            raise APIError(404, f"The model `{name}` does not exist.", "not_found_error",
                           "model", "model_not_found")  # fmt: skip
        return name, lora

    def cards(self) -> list[ModelCard]:
        mc = self.engine.config.model
        cards = [ModelCard(id=n, root=mc.model_path, max_model_len=mc.max_model_len)
                 for n in self.base_names]  # fmt: skip
        cards += [ModelCard(id=n, root=r.lora_path, parent=self.base, max_model_len=mc.max_model_len)
                  for n, r in self.adapters.items()]  # fmt: skip
        cards += [ModelCard(id=n, root=f"route:{r.small}|{r.large}", max_model_len=mc.max_model_len)
                  for n, r in self.routes().items()]  # fmt: skip
        return cards

    def card(self, name: str) -> ModelCard:
        reported, _ = self.resolve(name)
        return next(c for c in self.cards() if c.id == reported)

    def load(self, name: Any, path: Any) -> LoRARequest:
        """Check and register an adapter (ValueError: nothing is registered)."""
        if not isinstance(name, str) or not name:
            raise ValueError("lora_name must be a non-empty string")
        if not isinstance(path, str) or not path:
            raise ValueError("lora_path must be a non-empty string")
        if name in self.base_names or name in self.adapters or name in self.routes():
            raise ValueError(f"the model name {name!r} is already in use")
        if self.engine.config.lora is None:
            raise ValueError("this server was started without --enable-lora")
        lora = LoRARequest(name, next(self._ids), path, self.base)
        self.engine.input_processor.check_lora(lora)  # reads and checks every tensor
        self.adapters[name] = lora
        return lora

    async def unload(self, name: Any) -> None:
        lora = self.adapters.pop(name, None) if isinstance(name, str) else None
        if lora is None:
            raise APIError(404, f"The LoRA adapter `{name}` is not loaded.", "not_found_error",
                           "lora_name", "model_not_found")  # fmt: skip
        await self.engine.remove_lora(lora.lora_int_id)
