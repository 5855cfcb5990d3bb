"""Who plays which role. The only module that maps ranks to roles.

World layout: ranks ``0 .. N-1`` are the anchor ranks (one DeepSpeed ZeRO-3 data-parallel group);
then come the augment pipeline stages of each augmenting model in turn: model 0 (the ``augment``
section) on ranks ``N .. N+S-1``, then each extra augmenting model's stages. Every step, anchor rank
``i`` trains on micro-batch ``i``; each model's pipeline produces the tapped activations of every
micro-batch in the order (step, anchor rank) and sends each tap straight to the anchor rank that owns
the micro-batch, tagged with a slot of its own: no two models share a slot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

ANCHOR, AUGMENT = "anchor", "augment"
MAX_WIRE_SLOTS = 62  # distinct tapped layers over all models: each takes one of transport.TAG_SLOTS


@dataclass(frozen=True)
class Role:
    kind: str  # ANCHOR or AUGMENT
    index: int  # anchor rank index, or stage index within its augmenting model
    model: int = 0  # an augment stage's augmenting model (0: the ``augment`` section)

    @property
    def name(self) -> str:
        if self.kind == ANCHOR:
            return f"anchor-rank-{self.index}"
        return f"augment-stage-{self.index}" if self.model == 0 else f"augment{self.model}-stage-{self.index}"


@dataclass(frozen=True)
class AugmentPipeline:
    """One augmenting model's forward-only pipeline: its stage ranks and the tag slots of its taps."""

    model: int
    first_rank: int
    first_slot: int
    stage_layers: tuple[range, ...]  # contiguous decoder layers of each stage
    tapped_layers: tuple[int, ...]  # layers read by this model's bridges, in bridge order

    @property
    def stages(self) -> int:
        return len(self.stage_layers)

    def stage_rank(self, stage: int) -> int:
        return self.first_rank + stage

    @property
    def wire_layers(self) -> list[int]:
        """Distinct tapped layers, in order: each crosses the wire once per micro-batch, however many
        bridges read it."""
        return sorted(set(self.tapped_layers))

    def slot_of(self, layer: int) -> int:
        return self.first_slot + self.wire_layers.index(layer)

    @property
    def wire_slots(self) -> list[tuple[int, int]]:
        """(tag slot, layer) of every distinct tapped layer."""
        return [(self.slot_of(layer), layer) for layer in self.wire_layers]

    def stage_of_layer(self, layer: int) -> int:
        for stage, layers in enumerate(self.stage_layers):
            if layer in layers:
                return stage
        raise ValueError(f"augment layer {layer} of augmenting model {self.model} belongs to no stage")

    def taps_of_stage(self, stage: int) -> list[tuple[int, int]]:
        """(tag slot, layer) pairs whose activations this stage sends."""
        return [(slot, layer) for slot, layer in self.wire_slots if layer in self.stage_layers[stage]]


@dataclass(frozen=True)
class Topology:
    """``augment_stages``, ``stage_layers`` and ``tapped_layers`` describe model 0's pipeline (the only
    one in a single-augment run); ``extra_pipelines`` the others, in model order."""

    anchor_ranks: int
    augment_stages: int
    stage_layers: tuple[range, ...]
    tapped_layers: tuple[int, ...]
    extra_pipelines: tuple[AugmentPipeline, ...] = ()

    @property
    def pipelines(self) -> tuple[AugmentPipeline, ...]:
        first = AugmentPipeline(0, self.anchor_ranks, 0, self.stage_layers, self.tapped_layers)
        return (first, *self.extra_pipelines)

    @property
    def world_size(self) -> int:
        return self.anchor_ranks + sum(pipeline.stages for pipeline in self.pipelines)

    def role_of(self, rank: int) -> Role:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} ranks")
        if rank < self.anchor_ranks:
            return Role(ANCHOR, rank)
        pipeline = next(p for p in reversed(self.pipelines) if rank >= p.first_rank)
        return Role(AUGMENT, rank - pipeline.first_rank, pipeline.model)

    def pipeline_of(self, role: Role) -> AugmentPipeline:
        assert role.kind == AUGMENT, role
        return self.pipelines[role.model]

    def anchor_rank(self, index: int) -> int:
        return index

    def stage_rank(self, stage: int, model: int = 0) -> int:
        return self.pipelines[model].stage_rank(stage)

    @property
    def anchor_group_ranks(self) -> list[int]:
        return list(range(self.anchor_ranks))

    @property
    def bridge_slots(self) -> list[int]:
        """The tag slot each bridge reads, in flat bridge order (model 0's bridges first)."""
        return [pipeline.slot_of(layer) for pipeline in self.pipelines for layer in pipeline.tapped_layers]

    # model 0's pipeline, as in a single-augment run
    def stage_of_layer(self, layer: int) -> int:
        return self.pipelines[0].stage_of_layer(layer)

    @property
    def wire_layers(self) -> list[int]:
        return self.pipelines[0].wire_layers

    def taps_of_stage(self, stage: int) -> list[tuple[int, int]]:
        return self.pipelines[0].taps_of_stage(stage)


@dataclass(frozen=True)
class AugmentSpec:
    """What planning needs of one augmenting model."""

    stages: int
    layer_sizes: tuple[int, ...]  # parameter count of each decoder layer
    tapped_layers: tuple[int, ...]  # in bridge order
    stages_key: str  # the config key of ``stages``, for error messages


def balance_stages(layer_sizes: Sequence[int], stages: int,
                   stages_key: str = "parallel.augment_stages") -> tuple[range, ...]:
    """Contiguous split of layers into ``stages`` non-empty ranges minimising the largest total size."""
    count = len(layer_sizes)
    if not 1 <= stages <= count:
        raise ValueError(
            f"{stages_key}={stages} must be between 1 and the {count} augment layers the "
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
    """A single-augment plan; ``augment_layer_sizes`` are parameter counts per layer."""
    spec = AugmentSpec(augment_stages, tuple(augment_layer_sizes), tuple(tapped_layers), "parallel.augment_stages")
    return plan_models_topology(world_size, anchor_ranks, [spec])


def plan_models_topology(world_size: int, anchor_ranks: int, augments: Sequence[AugmentSpec]) -> Topology:
    """Validates the plan and assigns roles: anchor ranks, then each augmenting model's stages."""
    if anchor_ranks < 1:
        raise ValueError(f"parallel.anchor_ranks must be >= 1, got {anchor_ranks}")
    for spec in augments:
        if spec.stages < 1:
            raise ValueError(f"{spec.stages_key} must be >= 1, got {spec.stages}")
    planned = anchor_ranks + sum(spec.stages for spec in augments)
    if world_size != planned:
        stages = " + ".join(f"{spec.stages_key} ({spec.stages})" for spec in augments)
        raise ValueError(f"world size {world_size} != parallel.anchor_ranks ({anchor_ranks}) + {stages}; "
                         f"launch {planned} processes or change the plan")
    slots = sum(len(set(spec.tapped_layers)) for spec in augments)
    if slots > MAX_WIRE_SLOTS:
        raise ValueError(f"{slots} distinct tapped augment layers (over all augmenting models): "
                         f"at most {MAX_WIRE_SLOTS} are supported")
    pipelines, first_rank, first_slot = [], anchor_ranks, 0
    for model, spec in enumerate(augments):
        needed = max(spec.tapped_layers) + 1  # layers above the deepest tap never run
        stage_layers = balance_stages(list(spec.layer_sizes)[:needed], spec.stages, spec.stages_key)
        pipelines.append(AugmentPipeline(model, first_rank, first_slot, stage_layers, spec.tapped_layers))
        first_rank += spec.stages
        first_slot += len(set(spec.tapped_layers))
    first = pipelines[0]
    return Topology(anchor_ranks, first.stages, first.stage_layers, first.tapped_layers, tuple(pipelines[1:]))

