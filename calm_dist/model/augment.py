"""The augmenting side: decoder layers wrapped so one forward returns the tapped layer outputs.

A tap is the output of an augment decoder layer, as Hugging Face's ``hidden_states[layer + 1]``: the
raw layer output, except for the final layer, whose tap is after the model's final norm (the
backbone's ``last_hidden_state``). The same wrappers let
a pipeline stage run only its own contiguous slice of layers, with its input injected at the first
one; layers outside the slice pass their input through untouched.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class TapPlan:
    """What one augment forward computes: layers ``start..stop-1``, recording ``record``."""

    start: int
    stop: int
    record: frozenset[int]
    final_layer: int  # the model's last decoder layer: its tap is taken after the final norm
    inject: torch.Tensor | None = None  # the input of layer ``start`` (pipeline stages after the first)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)


class TappedDecoderLayer(nn.Module):
    def __init__(self, layer: nn.Module, index: int):
        super().__init__()
        self.layer = layer
        self.index = index

    def forward(self, hidden_states, *args, calm_taps: TapPlan | None = None, **kwargs):
        if calm_taps is None:
            return self.layer(hidden_states, *args, **kwargs)
        if not calm_taps.start <= self.index < calm_taps.stop:
            return hidden_states
        if self.index == calm_taps.start and calm_taps.inject is not None:
            hidden_states = calm_taps.inject.to(hidden_states.dtype)
        output = self.layer(hidden_states, *args, **kwargs)
        if self.index in calm_taps.record:
            calm_taps.outputs[self.index] = output[0] if isinstance(output, tuple) else output
        return output

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


def wrap_augment_layers(layers: nn.ModuleList) -> None:
    """Wrap every augment decoder layer in place (idempotent)."""
    for index, layer in enumerate(layers):
        if not isinstance(layer, TappedDecoderLayer):
            layers[index] = TappedDecoderLayer(layer, index)


def run_augment(backbone: nn.Module, plan: TapPlan, *, input_ids=None, inputs_embeds=None,
                attention_mask=None, position_ids=None, cache=None) -> TapPlan:
    """One forward of the augment backbone under ``plan``; fills ``plan.outputs``."""
    output = backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                      position_ids=position_ids, cache=cache, use_cache=cache is not None, calm_taps=plan)
    if plan.final_layer in plan.outputs:
        plan.outputs[plan.final_layer] = output.last_hidden_state  # after the final norm, as HF's hidden_states
    missing = plan.record - set(plan.outputs)
    assert not missing, f"augment layers {sorted(missing)} did not run"
    return plan
