"""The composed model: a frozen anchor, a frozen augmenting model and the trainable bridges."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from calm_dist.model.augment import TapPlan, run_augment, wrap_augment_layers
from calm_dist.model.bridge import BridgeInput, CompositionContext, CrossAttentionBridge, ProjectedKV
from calm_dist.model.connections import resolve_connections
from calm_dist.model.layers import ModelShape, backbone, find_decoder_layers, model_shape
from calm_dist.model.loss import causal_lm_loss
from calm_dist.model.masks import cross_attention_allowed, position_ids_from_mask
from calm_dist.model.wrapped_layer import wrap_anchor_layers


def freeze(model: nn.Module) -> nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


class CALMModel(nn.Module):
    """anchor (m_B) + augment (m_A) + one cross-attention bridge per connection.

    ``augment`` may be None when its tapped hidden states are produced elsewhere (the augment
    pipeline of the distributed runtime); they are then passed as ``augment_states``.
    """

    def __init__(self, anchor: nn.Module, augment: nn.Module | None, connections, augment_shape: ModelShape,
                 relative_scale: bool = False):
        super().__init__()
        self.anchor = freeze(anchor)
        self.augment = freeze(augment) if augment is not None else None
        self.anchor_shape = model_shape(anchor)
        self.augment_shape = augment_shape
        self.connections = list(connections)
        self.bridges = nn.ModuleList(
            CrossAttentionBridge(augment_shape.hidden_size, self.anchor_shape.hidden_size, self.anchor_shape.num_heads,
                                 relative_scale)
            for _ in self.connections
        )
        self.bridges.to(next(anchor.parameters()).device)
        wrap_anchor_layers(find_decoder_layers(anchor), self.bridges, self.connections)
        if augment is not None:
            wrap_augment_layers(find_decoder_layers(augment))

    @property
    def tapped_layers(self) -> list[int]:
        """Augment layers whose outputs the bridges read, in bridge order."""
        return [augment_layer for augment_layer, _ in self.connections]

    def train(self, mode: bool = True):
        self.training = mode
        self.bridges.train(mode)
        return self  # both base models stay in eval mode: no dropout, frozen statistics

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.bridges.parameters())

    def composition_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"bridges.{name}": tensor for name, tensor in self.bridges.state_dict().items()}

    def load_composition_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        prefix = "bridges."
        unexpected = [key for key in state if not key.startswith(prefix)]
        if unexpected:
            raise ValueError(f"not composition parameters: {unexpected[:5]}")
        self.bridges.load_state_dict({key[len(prefix):]: value for key, value in state.items()})

    @torch.no_grad()
    def augment_hidden_states(self, input_ids, attention_mask, position_ids, cache=None) -> list[torch.Tensor]:
        """The tapped augment layers' outputs (see ``augment.py``); layers above the deepest tap do not run."""
        if self.augment is None:
            raise ValueError("this composed model has no augmenting model: pass augment_states")
        tapped = self.tapped_layers
        plan = TapPlan(0, max(tapped) + 1, frozenset(tapped), self.augment_shape.num_layers - 1)
        run_augment(backbone(self.augment), plan, input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids, cache=cache)
        return [plan.outputs[layer] for layer in tapped]

    def _context(self, augment_states, attention_mask, past_len, query_len, caches):
        allowed = cross_attention_allowed(attention_mask, past_len, query_len)
        caches = caches if caches is not None else [None] * len(self.bridges)
        inputs = [BridgeInput(state, cache) for state, cache in zip(augment_states, caches)]
        return CompositionContext(inputs, allowed, allowed.any(dim=-1, keepdim=True))

    def step(self, input_ids, attention_mask, *, caches=None, augment_states=None, logits_to_keep=0):
        """One forward over new tokens ``input_ids`` given the full ``attention_mask`` so far.

        ``caches`` (generation) is a dict with the anchor's and augment's HF caches and one
        ProjectedKV per bridge; without it this is a plain full-sequence forward.
        """
        past_len = attention_mask.shape[-1] - input_ids.shape[-1]
        position_ids = position_ids_from_mask(attention_mask)[:, past_len:]
        caches = caches or {}
        if augment_states is None:
            augment_states = self.augment_hidden_states(
                input_ids, attention_mask, position_ids, caches.get("augment")
            )
        if len(augment_states) != len(self.bridges):
            raise ValueError(f"expected {len(self.bridges)} augment states, got {len(augment_states)}")
        context = self._context(augment_states, attention_mask, past_len, input_ids.shape[-1], caches.get("bridges"))
        extra = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        return self.anchor(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=caches.get("anchor"),
            use_cache="anchor" in caches,
            calm_context=context,
            **extra,
        )

    def forward(self, input_ids, attention_mask=None, labels=None, augment_states=None) -> CausalLMOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = self.step(input_ids, attention_mask, augment_states=augment_states).logits
        loss = causal_lm_loss(logits, labels, attention_mask) if labels is not None else None
        return CausalLMOutput(loss=loss, logits=logits)

    def new_caches(self) -> dict:
        from transformers import DynamicCache

        caches = {"anchor": DynamicCache(config=self.anchor.config), "bridges": [ProjectedKV() for _ in self.bridges]}
        if self.augment is not None:
            caches["augment"] = DynamicCache(config=self.augment.config)
        return caches

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 8, **kwargs):
        from calm_dist.model.generation import greedy_generate

        return greedy_generate(self, input_ids, attention_mask, max_new_tokens, **kwargs)


def compose(
    anchor: nn.Module,
    augment: nn.Module,
    every_n: int | None = None,
    connections: Sequence[Sequence[int]] | None = None,
    relative_scale: bool = False,
) -> CALMModel:
    """Compose a frozen anchor (m_B) with a frozen augmenting model (m_A).

    ``every_n`` taps every n-th augment layer (default 4) and feeds n-evenly spaced anchor layers;
    ``connections`` gives explicit ``(augment_layer, anchor_layer)`` pairs (0-based; anchor -1 =
    after the embeddings). The anchor's layers are wrapped in place. ``relative_scale`` multiplies each
    bridge's output by the anchor's per-token hidden-state RMS there (detached), so one optimizer step
    perturbs every layer by a similar fraction; the default is the paper's plain residual.
    """
    anchor_shape, augment_shape = model_shape(anchor), model_shape(augment)
    check_vocabularies(anchor_shape, augment_shape)
    pairs = resolve_connections(augment_shape.num_layers, anchor_shape.num_layers, every_n, connections)
    return CALMModel(anchor, augment, pairs, augment_shape, relative_scale)


def check_vocabularies(anchor_shape: ModelShape, augment_shape: ModelShape) -> None:
    if anchor_shape.vocab_size != augment_shape.vocab_size:
        raise ValueError(
            f"vocabulary size mismatch: anchor has {anchor_shape.vocab_size} tokens, augmenting model "
            f"{augment_shape.vocab_size}. Both models must read the same token ids (one tokenizer)."
        )
