"""An anchor decoder layer wrapped with the bridges that add to its input or output."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from calm_dist.model.bridge import CompositionContext, CrossAttentionBridge


class ComposedDecoderLayer(nn.Module):
    """Runs the original layer, then adds each attached bridge's residual to its output.

    Bridges are owned by the composed model (``CALMModel.bridges``); the wrapper keeps plain
    references, so parameters have one name and the anchor's own state stays under ``layer``.
    The per-forward bridge inputs arrive as the ``calm_context`` keyword, which Hugging Face
    decoder stacks pass through to every layer; without it the wrapper is the plain layer.

    ``checkpointed``: when its input carries a gradient (the layer is above the first bridge) or a bridge
    adds to its input, the layer and its bridges keep only that input for backward and run again there
    (activation checkpointing).
    Hugging Face's own checkpointing cannot do this for a frozen anchor: it runs only in training mode,
    which would switch the anchor's dropout on, and it makes the embeddings' output require a gradient, so
    that backward would run through every layer below the first bridge too.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.checkpointed = False
        self._before: list[tuple[int, CrossAttentionBridge]] = []
        self._after: list[tuple[int, CrossAttentionBridge]] = []

    def attach(self, index: int, bridge: CrossAttentionBridge, before: bool = False) -> None:
        (self._before if before else self._after).append((index, bridge))

    @staticmethod
    def _add_bridges(hidden, bridges, context: CompositionContext):
        residual = 0
        for index, bridge in bridges:
            residual = residual + bridge(hidden, context.inputs[index])
        return hidden + residual if bridges else hidden

    def forward(self, hidden_states, *args, calm_context: CompositionContext | None = None, **kwargs):
        if self.checkpointed and torch.is_grad_enabled() and (hidden_states.requires_grad or self._before):
            return checkpoint(self._run, hidden_states, *args, calm_context=calm_context, use_reentrant=False,
                              **kwargs)
        return self._run(hidden_states, *args, calm_context=calm_context, **kwargs)

    def _run(self, hidden_states, *args, calm_context: CompositionContext | None = None, **kwargs):
        if calm_context is not None:
            hidden_states = self._add_bridges(hidden_states, self._before, calm_context)
        output = self.layer(hidden_states, *args, **kwargs)
        if calm_context is None:
            return output
        if isinstance(output, tuple):
            return (self._add_bridges(output[0], self._after, calm_context),) + output[1:]
        return self._add_bridges(output, self._after, calm_context)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Decoder stacks read layer attributes such as ``attention_type``.
            return getattr(self._modules["layer"], name)


def wrap_anchor_layers(layers: nn.ModuleList, bridges, connections) -> list[ComposedDecoderLayer]:
    """Replace the anchor layers that receive a bridge with wrappers, in place."""
    wrappers: dict[int, ComposedDecoderLayer] = {}
    for index, ((_, anchor_layer), bridge) in enumerate(zip(connections, bridges)):
        position = max(anchor_layer, 0)
        if position not in wrappers:
            existing = layers[position]
            if isinstance(existing, ComposedDecoderLayer):
                raise ValueError("this anchor is already part of a composed model; pass a fresh anchor")
            wrappers[position] = ComposedDecoderLayer(existing)
            layers[position] = wrappers[position]
        wrappers[position].attach(index, bridge, before=anchor_layer < 0)
    return list(wrappers.values())


def checkpoint_anchor_layers(layers: nn.ModuleList) -> int:
    """Activation checkpointing for every anchor decoder layer (those without a bridge get a wrapper too), in
    place; returns how many layers there are. Only layers above the first bridge recompute."""
    for position, layer in enumerate(layers):
        if not isinstance(layer, ComposedDecoderLayer):
            layers[position] = ComposedDecoderLayer(layer)
        layers[position].checkpointed = True
    return len(layers)
