"""Multi-LoRA serving: PEFT adapters applied on top of any base layer, per token.

    request ── LoRARequest(name, id, path) ──► scheduler (at most max_loras distinct
    adapters among running requests; prefix-cache keys include the adapter)
            ──► worker: LoRAManager keeps up to max_cpu_loras adapters loaded (LRU),
                builds the step's adapter groups (tokens of each adapter)
            ──► every targeted Linear: y = base(x) + Σ_groups (x_g A_gᵀ) B_gᵀ · scale

See ``adapter`` (reading and checking a PEFT directory) and ``layers`` (the batched
shrink/expand applied inside ``Linear``).
"""

from pagellm.lora.request import LoRARequest

__all__ = ["LoRARequest"]
