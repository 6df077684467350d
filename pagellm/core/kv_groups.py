"""KV cache groups: how layers of different attention kinds share one block pool.

A model whose layers all attend the same way (all full, or all with the same sliding
window) has one group: a block id addresses one token block in every layer. A model that
mixes kinds (Gemma 3: five sliding-window layers to one global) would waste most of its
cache if every layer kept every block, so its layers are split into groups of equal
size, each group of a single kind, and every request holds one block table per group:

    layers (kind)      0 S  1 S  2 S  3 S  4 S  5 F  6 S  7 S  ...
    group size 2:      groups (F: 5, 11) (S: 0, 1) (S: 2, 3) ...   slots 0, 1

The KV tensors are per *slot* (as many as the group size), not per layer: layer j of
every group uses slot j's tensors, so a block id is a page across the slots, owned by one
group at a time. Full-attention groups keep a request's whole length; a sliding group
frees blocks behind its window, so for a long request most pages belong to the global
layers. This is vLLM's hybrid allocator in small: one pool, one page size, no split of
the budget between kinds to tune.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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
