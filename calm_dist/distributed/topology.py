"""Who plays which role. The only module that maps ranks to roles.

World layout: ranks ``0 .. N-1`` are the anchor ranks (one DeepSpeed ZeRO-3 data-parallel group);
ranks ``N .. N+S-1`` are the augment pipeline stages 0..S-1. Every step, anchor rank ``i`` trains on
micro-batch ``i``; the pipeline produces the tapped activations of every micro-batch in the order
(step, anchor rank) and sends each tap straight to the anchor rank that owns the micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

ANCHOR, AUGMENT = "anchor", "augment"


@dataclass(frozen=True)
class Role:
    kind: str  # ANCHOR or AUGMENT
    index: int  # anchor rank index or augment stage index

    @property
    def name(self) -> str:
        return f"anchor-rank-{self.index}" if self.kind == ANCHOR else f"augment-stage-{self.index}"


@dataclass(frozen=True)
class Topology:
    anchor_ranks: int
    augment_stages: int
    stage_layers: tuple[range, ...]  # contiguous augment decoder layers of each stage
    tapped_layers: tuple[int, ...]  # augment layers read by the bridges, in bridge order

    @property
    def world_size(self) -> int:
        return self.anchor_ranks + self.augment_stages

    def role_of(self, rank: int) -> Role:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} ranks")
        if rank < self.anchor_ranks:
            return Role(ANCHOR, rank)
        return Role(AUGMENT, rank - self.anchor_ranks)

    def anchor_rank(self, index: int) -> int:
        return index

    def stage_rank(self, stage: int) -> int:
        return self.anchor_ranks + stage

    @property
    def anchor_group_ranks(self) -> list[int]:
        return list(range(self.anchor_ranks))

    def stage_of_layer(self, layer: int) -> int:
        for stage, layers in enumerate(self.stage_layers):
            if layer in layers:
                return stage
        raise ValueError(f"augment layer {layer} belongs to no stage")

    @property
    def wire_layers(self) -> list[int]:
        """Distinct tapped augment layers, in order: each crosses the wire once per micro-batch,
        however many bridges read it. A layer's position here is its tag slot."""
        return sorted(set(self.tapped_layers))

    def taps_of_stage(self, stage: int) -> list[tuple[int, int]]:
        """(tag slot, augment layer) pairs whose activations this stage sends."""
        return [(slot, layer) for slot, layer in enumerate(self.wire_layers) if layer in self.stage_layers[stage]]


def balance_stages(layer_sizes: Sequence[int], stages: int) -> tuple[range, ...]:
    """Contiguous split of layers into ``stages`` non-empty ranges minimising the largest total size."""
    count = len(layer_sizes)
    if not 1 <= stages <= count:
        raise ValueError(
            f"parallel.augment_stages={stages} must be between 1 and the {count} augment layers the "
            "bridges need (each stage holds at least one layer)"
        )
    prefix = [0]
    for size in layer_sizes:
        prefix.append(prefix[-1] + size)
    best = {(0, 0): (0, None)}  # (layers used, stages used) -> (max stage size, previous cut)
    for used_stages in range(1, stages + 1):
        for end in range(used_stages, count - (stages - used_stages) + 1):
            options = [
                (max(best[(start, used_stages - 1)][0], prefix[end] - prefix[start]), start)
                for start in range(used_stages - 1, end)
                if (start, used_stages - 1) in best
            ]
            best[(end, used_stages)] = min(options)
    cuts, end = [], count
    for used_stages in range(stages, 0, -1):
        start = best[(end, used_stages)][1]
        cuts.append(range(start, end))
        end = start
    return tuple(reversed(cuts))


def plan_topology(world_size: int, anchor_ranks: int, augment_stages: int,
                  augment_layer_sizes: Sequence[int], tapped_layers: Sequence[int]) -> Topology:
    """Validates the plan and assigns roles; ``augment_layer_sizes`` are parameter counts per layer."""
    if anchor_ranks < 1:
        raise ValueError(f"parallel.anchor_ranks must be >= 1, got {anchor_ranks}")
    if augment_stages < 1:
        raise ValueError(f"parallel.augment_stages must be >= 1, got {augment_stages}")
    if world_size != anchor_ranks + augment_stages:
        raise ValueError(
            f"world size {world_size} != parallel.anchor_ranks ({anchor_ranks}) + parallel.augment_stages "
            f"({augment_stages}); launch {anchor_ranks + augment_stages} processes or change the plan"
        )
    if len(set(tapped_layers)) >= 63:
        raise ValueError(f"{len(set(tapped_layers))} distinct tapped augment layers: at most 62 are supported")
    needed = max(tapped_layers) + 1  # layers above the deepest tap never run
    stage_layers = balance_stages(list(augment_layer_sizes)[:needed], augment_stages)
    return Topology(anchor_ranks, augment_stages, stage_layers, tuple(tapped_layers))
