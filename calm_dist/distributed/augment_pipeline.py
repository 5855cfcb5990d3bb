"""Augment pipeline stages: forward only, no_grad, streaming tapped activations to the anchor ranks.

Each augmenting model has a pipeline of its own; a stage only talks to its neighbours in that pipeline
and to the anchor ranks."""
from __future__ import annotations

import torch
from torch import nn

from calm_dist.distributed.groups import Groups
from calm_dist.distributed.transport import HIDDEN_SLOT, ActivationReceiver, ActivationSender, sequence_of, tag_of
from calm_dist.model.augment import TapPlan, run_augment, wrap_augment_layers
from calm_dist.model.composed import freeze
from calm_dist.model.layers import backbone, find_decoder_layers
from calm_dist.model.masks import position_ids_from_mask


class AugmentStage:
    """A contiguous slice of the augmenting model's decoder layers; other layers' weights are dropped."""

    def __init__(self, augment: nn.Module, layers: range, record: set[int]):
        self.model = freeze(augment)
        self.backbone = backbone(augment)
        self.layers, self.record = layers, frozenset(record)
        decoder = find_decoder_layers(augment)
        self.final_layer = len(decoder) - 1
        wrap_augment_layers(decoder)
        for index, wrapped in enumerate(decoder):
            if index not in layers:
                wrapped.layer = nn.Module()  # never called: the stage passes its input through
        self.hidden_size = augment.config.get_text_config().hidden_size
        self.dtype = next(self.model.parameters()).dtype

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, inject: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        plan = TapPlan(self.layers.start, self.layers.stop, self.record, self.final_layer, inject=inject)
        position_ids = position_ids_from_mask(attention_mask)
        if inject is None:
            run_augment(self.backbone, plan, input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids)
        else:  # the injected hidden state replaces the embeddings at this stage's first layer
            placeholder = torch.zeros(*input_ids.shape, self.hidden_size, dtype=self.dtype, device=input_ids.device)
            run_augment(self.backbone, plan, inputs_embeds=placeholder, attention_mask=attention_mask,
                        position_ids=position_ids)
        return plan.outputs


def stage_records(groups: Groups) -> set[int]:
    pipeline, stage = groups.topology.pipeline_of(groups.role), groups.role.index
    record = {layer for _, layer in pipeline.taps_of_stage(stage)}
    if stage < pipeline.stages - 1:
        record.add(pipeline.stage_layers[stage][-1])  # handed to the next stage
    return record


def run_stage(stage: AugmentStage, groups: Groups, sources, units, sender: ActivationSender,
              hidden_sender: ActivationSender, receiver: ActivationReceiver, column: str | None = None) -> None:
    """For every unit and every anchor rank's micro-batch of it (``sources``: one ``BatchSource`` per anchor
    rank): receive, compute, send taps and hidden state. ``column``: the model's own tokenisation of the rows
    (``<column>_input_ids`` / ``_attention_mask``), None = the anchor's tokens."""
    prefix = "" if column is None else f"{column}_"
    topology, index = groups.topology, groups.role.index
    pipeline = topology.pipeline_of(groups.role)
    taps = pipeline.taps_of_stage(index)
    last_layer = pipeline.stage_layers[index][-1]
    has_next = index < pipeline.stages - 1
    for unit_index, unit in enumerate(units):
        for anchor_index, source in enumerate(sources):
            batch, _ = source.batch(unit)
            ids = batch[f"{prefix}input_ids"].to(groups.device)
            mask = batch[f"{prefix}attention_mask"].to(groups.device)
            sequence = sequence_of(unit_index, anchor_index, topology.anchor_ranks)
            inject = None
            if index > 0:
                shape = (*ids.shape, stage.hidden_size)
                receiver.post(sequence, shape, pipeline.stage_rank(index - 1), tag_of(sequence, HIDDEN_SLOT))
                inject = receiver.wait(sequence, stage.dtype)
            outputs = stage.forward(ids, mask, inject)
            for slot, layer in taps:
                sender.send(outputs[layer], topology.anchor_rank(anchor_index), tag_of(sequence, slot))
            if has_next:
                hidden_sender.send(outputs[last_layer], pipeline.stage_rank(index + 1), tag_of(sequence, HIDDEN_SLOT))
    sender.flush()
    hidden_sender.flush()
