"""The web page: a chat playground (``/ui/``) and a live dashboard (``/ui/dashboard.html``).

Static files only (``static/``: HTML, CSS and plain JavaScript, no build step, no CDN),
shipped in the wheel. The pages talk to the server's own API: /v1/models and
/v1/chat/completions for the playground, /metrics (polled) and /server_info for the
dashboard. The files themselves need no API key; the API calls do: the page asks for the
key when a call is answered 401 and keeps it in the browser's localStorage.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")

UI_PREFIX = "/ui"


def is_open_path(path: str) -> bool:
    """The page's own files (and the redirect to them) need no API key."""
    return path == "/" or path == UI_PREFIX or path.startswith(UI_PREFIX + "/")


def add_routes(app: Any, info: Callable[[], dict[str, Any]]) -> None:
    """Mount the static files at /ui, redirect / there and serve ``info()`` at
    /server_info (the engine configuration and memory plan; behind the API key)."""
    from fastapi.responses import JSONResponse, RedirectResponse
    from fastapi.staticfiles import StaticFiles

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(UI_PREFIX + "/")

    @app.get(UI_PREFIX, include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse(UI_PREFIX + "/")

    @app.get("/server_info")
    async def server_info() -> JSONResponse:
        return JSONResponse(info())

    app.mount(UI_PREFIX, StaticFiles(directory=STATIC_DIR, html=True), name="ui")


def _plain(value: Any) -> Any:
    """A config value as JSON: dataclasses field by field, the rest as str."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


_HF_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "max_position_embeddings", "rope_theta", "tie_word_embeddings", "sliding_window",
)  # fmt: skip


def engine_config(config: Any) -> dict[str, Any]:
    """The resolved engine configuration; the model's network config by its main sizes."""
    out = _plain(config)
    hf = getattr(config.model, "hf_config", None)
    out["model"]["hf_config"] = {k: _plain(getattr(hf, k)) for k in _HF_FIELDS if hasattr(hf, k)}
    return out


def memory_plan(plan: Any) -> dict[str, Any]:
    """The KV memory plan: what the weights and the paged KV cache take."""
    return {
        "weight_bytes": plan.weight_bytes,
        "kv_bytes_per_token": plan.kv_bytes_per_token,
        "block_size": plan.block_size,
        "num_blocks": plan.num_blocks,
        "num_tokens": plan.num_tokens,
        "kv_bytes": plan.kv_bytes,
        "budget_bytes": plan.budget_bytes,
        "max_model_len": plan.max_model_len,
        "max_concurrency": round(plan.max_concurrency, 2),
        "num_tier_slots": plan.num_tier_slots,
        "groups": [{"window": g.window, "layers": list(g.layers)} for g in plan.layout.groups],
        "summary": plan.describe(),
    }
