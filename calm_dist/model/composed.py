"""The composed model: a frozen anchor, frozen augmenting model(s) and the trainable bridges."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from calm_dist.model.alignment import AugmentInput, aligned_allowed
from calm_dist.model.augment import TapPlan, run_augment, wrap_augment_layers
from calm_dist.model.bridge import ALIGNED_LOGIT, BridgeInput, CompositionContext, CrossAttentionBridge, CrossMask
from calm_dist.model.cache import BridgeMemory, CALMCache, growing_cache
from calm_dist.model.connections import resolve_connections, resolve_per_model_connections
from calm_dist.model.layers import ModelShape, backbone, find_decoder_layers, model_shape
from calm_dist.model.loss import TokenStatistics, causal_lm_loss, predicting_positions, token_statistics
from calm_dist.model.masks import cross_attention_allowed, position_ids_from_mask
from calm_dist.model.wrapped_layer import checkpoint_anchor_layers, wrap_anchor_layers


@dataclass
class CALMOutput(CausalLMOutput):
    """``logits`` are ``[B, T, V]``, or with ``logits_for="labels"`` only the ``[N, V]`` rows of the positions
    that predict a labelled token; ``statistics`` then holds what evaluation needs."""

    statistics: TokenStatistics | None = None


def freeze(model: nn.Module) -> nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


class CALMModel(nn.Module):
    """anchor (m_B) + augmenting model(s) (m_A) + one cross-attention bridge per connection.

    Single form: ``CALMModel(anchor, augment, [(augment_layer, anchor_layer), ...], augment_shape)``.
    Several augmenting models: ``augment``, ``connections`` and ``augment_shape`` are lists with one
    entry per model (the model, its list of pairs, its ``ModelShape``). Bridges are in *bridge order*:
    model 0's connections, then model 1's, ...; ``connections`` is that flat list of pairs and
    ``bridge_sources`` the augmenting model of each bridge.

    Augmenting models may be None (all of them; ``augment=None`` in either form) when their tapped
    hidden states are produced elsewhere (the augment pipeline of the distributed runtime); they are
    then passed as ``augment_states``: one tensor per bridge, in bridge order.
    """

    def __init__(self, anchor: nn.Module, augment, connections, augment_shape: ModelShape | Sequence[ModelShape],
                 relative_scale: bool = False, own_tokenizer: Sequence[bool] | None = None,
                 position_buckets: int = 0, aligned_logit: float = ALIGNED_LOGIT):
        super().__init__()
        augments, per_model_connections, shapes = _augment_specs(augment, connections, augment_shape)
        # Models with a tokenizer of their own read their own tokenisation (augment_inputs), never the anchor's ids.
        self.own_tokenizer = list(own_tokenizer) if own_tokenizer is not None else [False] * len(shapes)
        check_position_buckets(position_buckets, self.own_tokenizer)
        self.anchor = freeze(anchor)
        self._anchor_slices_logits = "logits_to_keep" in inspect.signature(anchor.forward).parameters
        self.augments = nn.ModuleList(freeze(model) for model in augments) if augments[0] is not None else augments
        self.anchor_shape = model_shape(anchor)
        self.augment_shapes = shapes
        self.augment_connections = per_model_connections
        self.connections = [pair for pairs in per_model_connections for pair in pairs]
        self.bridge_sources = [index for index, pairs in enumerate(per_model_connections) for _ in pairs]
        self.bridges = nn.ModuleList(
            CrossAttentionBridge(shapes[source].hidden_size, self.anchor_shape.hidden_size,
                                 self.anchor_shape.num_heads, relative_scale, position_buckets, aligned_logit)
            for source in self.bridge_sources
        )
        self.bridges.to(next(anchor.parameters()).device)
        wrap_anchor_layers(find_decoder_layers(anchor), self.bridges, self.connections)
        for model in augments:
            if model is not None:
                wrap_augment_layers(find_decoder_layers(model))

    @property
    def position_buckets(self) -> int:
        bias = self.bridges[0].position_bias
        return 0 if bias is None else bias.shape[1]

    @property
    def augment(self) -> nn.Module | None:
        """The first augmenting model (the only one in the single form)."""
        return self.augments[0]

    @property
    def augment_shape(self) -> ModelShape:
        return self.augment_shapes[0]

    @property
    def tapped_layers(self) -> list[int]:
        """Augment layers whose outputs the bridges read, in bridge order (one augmenting model only)."""
        if len(self.augment_shapes) != 1:
            raise ValueError(f"{len(self.augment_shapes)} augmenting models: use tapped_layers_of(model_index)")
        return self.tapped_layers_of(0)

    def tapped_layers_of(self, model_index: int) -> list[int]:
        """The layers of augmenting model ``model_index`` that its bridges read, in bridge order."""
        return [augment_layer for augment_layer, _ in self.augment_connections[model_index]]

    def train(self, mode: bool = True):
        self.training = mode
        self.bridges.train(mode)
        return self  # the base models stay in eval mode: no dropout, frozen statistics

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.bridges.parameters())

    def checkpoint_activations(self) -> "CALMModel":
        """Activation checkpointing (``deepspeed.activation_checkpointing``): each anchor layer above the first
        bridge keeps only its input for backward and runs again there, with the bridges it carries."""
        checkpoint_anchor_layers(find_decoder_layers(self.anchor))
        return self

    def composition_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"bridges.{name}": tensor for name, tensor in self.bridges.state_dict().items()}

    def load_composition_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        prefix = "bridges."
        unexpected = [key for key in state if not key.startswith(prefix)]
        if unexpected:
            raise ValueError(f"not composition parameters: {unexpected[:5]}")
        self.bridges.load_state_dict({key[len(prefix):]: value for key, value in state.items()})

    @torch.no_grad()
    def augment_hidden_states(self, input_ids, attention_mask, position_ids, caches=None,
                              augment_inputs: Sequence[AugmentInput | None] | None = None) -> list[torch.Tensor]:
        """The tapped layers' outputs of every augmenting model (see ``augment.py``): one tensor per
        bridge, in bridge order. Layers above a model's deepest tap do not run.

        A model reads the anchor's ``input_ids`` unless ``augment_inputs`` gives its own tokenisation;
        ``caches`` (generation) holds one HF cache per augmenting model.
        """
        if self.augments[0] is None:
            raise ValueError("this composed model has no augmenting models: pass augment_states")
        count = len(self.augments)
        caches = caches if caches is not None else [None] * count
        augment_inputs = augment_inputs if augment_inputs is not None else [None] * count
        states = []
        for index, (own, cache) in enumerate(zip(augment_inputs, caches)):
            if own is None:
                states += self._tapped_states(index, input_ids, attention_mask, position_ids, cache)
            else:  # its own tokens: those past what its cache holds are new
                cached = 0 if cache is None else cache.get_seq_length()
                new_ids = own.input_ids[:, cached:]
                if new_ids.shape[-1] == 0:  # the text grew by nothing this tokenizer sees (e.g. a special token)
                    states += self._no_new_states(index, new_ids)
                    continue
                own_positions = position_ids_from_mask(own.attention_mask)[:, cached:]
                states += self._tapped_states(index, new_ids, own.attention_mask, own_positions, cache)
        return states

    def _no_new_states(self, index, new_ids) -> list[torch.Tensor]:
        """Empty taps ``[B, 0, D_A]`` for a model with no new tokens: its bridges' memories stay as cached."""
        weight = next(self.augments[index].parameters())
        empty = weight.new_zeros((new_ids.shape[0], 0, self.augment_shapes[index].hidden_size))
        return [empty for _ in self.tapped_layers_of(index)]

    def _tapped_states(self, index, input_ids, attention_mask, position_ids, cache) -> list[torch.Tensor]:
        tapped = self.tapped_layers_of(index)
        plan = TapPlan(0, max(tapped) + 1, frozenset(tapped), self.augment_shapes[index].num_layers - 1)
        run_augment(backbone(self.augments[index]), plan, input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids, cache=cache)
        return [plan.outputs[layer] for layer in tapped]

    def _checked_augment_inputs(self, augment_inputs, anchor_end_offsets, attention_mask, caches):
        """One entry per augmenting model, on the anchor's device; ValueError for unusable inputs."""
        count = len(self.augment_shapes)
        if augment_inputs is None:
            augment_inputs = [None] * count
        if len(augment_inputs) != count:
            raise ValueError(f"augment_inputs: expected {count} entries (one per augmenting model, None = "
                             f"reads the anchor's ids), got {len(augment_inputs)}")
        needing = [index for index, (own, given) in enumerate(zip(self.own_tokenizer, augment_inputs))
                   if own and given is None]
        if needing and self.augments[0] is not None:
            raise ValueError(f"augmenting models {needing} have their own tokenizer: pass their tokenisation of the "
                             "same texts as augment_inputs (see calm_dist.model.alignment.token_end_offsets)")
        if all(own is None for own in augment_inputs):
            return list(augment_inputs)
        if caches is not None:
            self._check_own_caches(augment_inputs, caches)
        if anchor_end_offsets is None or tuple(anchor_end_offsets.shape) != tuple(attention_mask.shape):
            raise ValueError("augment_inputs need anchor_end_offsets, shaped like the anchor's attention_mask "
                             f"{tuple(attention_mask.shape)}")
        batch = attention_mask.shape[0]
        for index, own in enumerate(augment_inputs):
            if own is not None and own.input_ids.shape[0] != batch:
                raise ValueError(f"augment_inputs[{index}] has batch size {own.input_ids.shape[0]}, "
                                 f"the anchor's is {batch}")
        return [None if own is None else own.to(attention_mask.device) for own in augment_inputs]

    def _check_own_caches(self, augment_inputs, caches: CALMCache) -> None:
        """With caches, a model reading its own tokens holds the first P of them in its cache and its bridges'
        memories (the caller crops all of them to the prefix its new tokenisation kept)."""
        if self.augments[0] is None:
            return  # the states come from elsewhere
        augment_caches = caches.augments or [None] * len(augment_inputs)
        bridge_caches = caches.bridges or [None] * len(self.bridges)
        for index, own in enumerate(augment_inputs):
            if own is None:
                continue
            cached = None if augment_caches[index] is None else augment_caches[index].get_seq_length()
            held = {bridge_cache.length if bridge_cache is not None else None
                    for bridge_cache, source in zip(bridge_caches, self.bridge_sources) if source == index}
            if cached is None or held != {cached} or cached > own.input_ids.shape[-1]:
                raise ValueError(f"augment_inputs[{index}] with caches: its model's cache holds {cached} positions and "
                                 f"its bridges' memories {sorted(held, key=str)}, of its "
                                 f"{own.input_ids.shape[-1]} tokens; give every cache and crop them to one prefix of "
                                 "its tokenisation")

    def _cross_masks(self, attention_mask, past_len, query_len, augment_inputs, anchor_end_offsets, device):
        """One mask per augmenting model; models reading the anchor's ids share the index-based one
        (without padding, ``attention_mask`` None: causal only)."""
        index_mask = None
        masks = []
        for own in augment_inputs:
            if own is None:
                if index_mask is None:
                    index_mask = CrossMask.causal(past_len, query_len, device) if attention_mask is None else \
                        CrossMask.from_allowed(cross_attention_allowed(attention_mask, past_len, query_len))
                masks.append(index_mask)
            else:
                anchor_end = anchor_end_offsets.to(attention_mask.device).masked_fill(attention_mask == 0, 0)
                allowed = aligned_allowed(anchor_end, own.end_offsets, own.attention_mask, past_len, query_len)
                masks.append(CrossMask.from_allowed(allowed))
        return masks

    def step(self, input_ids, attention_mask, *, caches: CALMCache | None = None, augment_states=None,
             logits_to_keep=0, augment_inputs: Sequence[AugmentInput | None] | None = None, anchor_end_offsets=None):
        """One forward over new tokens ``input_ids`` given the full ``attention_mask`` so far (None: no
        padding anywhere, so neither model nor the bridges need a padding mask).

        ``caches`` (generation, from ``new_caches``) holds the anchor's HF cache, one HF cache per
        augmenting model and one BridgeMemory per bridge; without it this is a plain full-sequence forward.
        ``augment_inputs`` (one per augmenting model, None = reads the anchor's ids) gives models
        with their own tokenizer their tokenisation of the same texts; the anchor's tokens then need
        ``anchor_end_offsets`` ``[B, T]`` over all T tokens so far (see ``alignment.py``). With ``caches``
        such a model's inputs are its whole tokenisation so far: its cache and its bridges' memories
        hold the first P tokens of it and the tokens from P on run (``generate_text`` crops them
        to the prefix a re-tokenisation kept).
        """
        if attention_mask is None and augment_inputs is not None and any(own is not None for own in augment_inputs):
            # the offset alignment reads a mask over every anchor token so far, the cached ones included
            past = caches.get_seq_length() if caches is not None else 0
            attention_mask = input_ids.new_ones((input_ids.shape[0], past + input_ids.shape[-1]))
        if attention_mask is None:
            past_len = caches.get_seq_length() if caches is not None else 0
            position_ids = torch.arange(past_len, past_len + input_ids.shape[-1], device=input_ids.device)
            position_ids = position_ids.expand(input_ids.shape[0], -1)
        else:
            past_len = attention_mask.shape[-1] - input_ids.shape[-1]
            position_ids = position_ids_from_mask(attention_mask)[:, past_len:]
        augment_inputs = self._checked_augment_inputs(augment_inputs, anchor_end_offsets, attention_mask, caches)
        if augment_states is None:
            augment_states = self.augment_hidden_states(
                input_ids, attention_mask, position_ids, caches.augments if caches is not None else None,
                augment_inputs,
            )
        if len(augment_states) != len(self.bridges):
            raise ValueError(f"expected {len(self.bridges)} augment states (one per bridge), got {len(augment_states)}")
        masks = self._cross_masks(attention_mask, past_len, input_ids.shape[-1], augment_inputs, anchor_end_offsets,
                                  input_ids.device)
        bridge_caches = caches.bridges if caches is not None else [None] * len(self.bridges)
        context = CompositionContext([
            BridgeInput(state, masks[source], cache)
            for state, source, cache in zip(augment_states, self.bridge_sources, bridge_caches)
        ])
        keeping = isinstance(logits_to_keep, torch.Tensor) or logits_to_keep
        extra = {"logits_to_keep": logits_to_keep} if keeping else {}
        return self.anchor(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=caches.anchor if caches is not None else None,
            use_cache=caches is not None,
            calm_context=context,
            **extra,
        )

    def forward(self, input_ids, attention_mask=None, labels=None, augment_states=None, *,
                augment_inputs: Sequence[AugmentInput | None] | None = None, anchor_end_offsets=None,
                logits_for: str = "all", row_weight: torch.Tensor | None = None) -> CALMOutput:
        """``logits_for="labels"`` (with ``labels``) computes logits only where a labelled token is predicted
        and returns ``statistics``; ``row_weight`` [B] (0 = a padding row) then leaves rows out of them."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = dict(augment_states=augment_states, augment_inputs=augment_inputs,
                      anchor_end_offsets=anchor_end_offsets)
        if logits_for == "all":
            logits = self.step(input_ids, attention_mask, **inputs).logits
            loss = causal_lm_loss(logits, labels, attention_mask) if labels is not None else None
            return CALMOutput(loss=loss, logits=logits)
        if logits_for != "labels" or labels is None:
            raise ValueError(f"logits_for must be 'all', or 'labels' with labels given; got {logits_for!r}")
        positions = predicting_positions(labels, attention_mask)
        if self._anchor_slices_logits:
            logits = self.step(input_ids, attention_mask, logits_to_keep=positions, **inputs).logits
        else:
            logits = self.step(input_ids, attention_mask, **inputs).logits[positions]
        statistics = token_statistics(logits, labels, positions, row_weight)
        return CALMOutput(loss=statistics.mean_loss, logits=logits, statistics=statistics)

    def new_caches(self) -> CALMCache:
        """Empty generation caches for ``step``: the anchor's, each augmenting model's, each bridge's."""
        augments = [] if self.augments[0] is None else [growing_cache(model.config) for model in self.augments]
        return CALMCache(growing_cache(self.anchor.config), augments, [BridgeMemory() for _ in self.bridges])

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 8, **kwargs):
        from calm_dist.model.generation import greedy_generate

        return greedy_generate(self, input_ids, attention_mask, max_new_tokens, **kwargs)


@dataclass(frozen=True)
class CompositionSpec:
    """A composition, resolved: one list of (augment_layer, anchor_layer) pairs per augmenting model,
    the bridges' output scaling, and the seed of their initial weights."""

    connections: tuple[tuple[tuple[int, int], ...], ...]
    relative_scale: bool = False
    seed: int = 0
    # per augmenting model: whether it reads its own tokenizer's tokens (aligned by character offsets);
    # empty = every model reads the anchor's ids
    own_tokenizer: tuple[bool, ...] = ()
    position_buckets: int = 0  # bridges' learned logit by position distance (0: none, the paper's bridge)
    aligned_logit: float = 0.0  # its starting value at distance 0

    def to_dict(self) -> dict:
        data = {"connections": [[list(pair) for pair in pairs] for pairs in self.connections],
                "relative_scale": self.relative_scale, "seed": self.seed}
        if any(self.own_tokenizer):  # absent when all share the anchor's: earlier records stay equal
            data["own_tokenizer"] = list(self.own_tokenizer)
        if self.position_buckets:  # likewise
            data.update(position_buckets=self.position_buckets, aligned_logit=self.aligned_logit)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CompositionSpec":
        return cls(tuple(tuple((int(a), int(b)) for a, b in pairs) for pairs in data["connections"]),
                   bool(data["relative_scale"]), int(data["seed"]),
                   tuple(bool(own) for own in data.get("own_tokenizer", ())),
                   int(data.get("position_buckets", 0)), float(data.get("aligned_logit", 0.0)))

    def build(self, anchor: nn.Module, augments: Sequence[nn.Module] | None,
              augment_shapes: Sequence[ModelShape]) -> "CALMModel":
        return build_calm(anchor, augments, augment_shapes, self.connections, relative_scale=self.relative_scale,
                          seed=self.seed, own_tokenizer=self.own_tokenizer or None,
                          position_buckets=self.position_buckets, aligned_logit=self.aligned_logit)


def check_position_buckets(position_buckets: int, own_tokenizer: Sequence[bool]) -> None:
    """Position distances mean something only where both models read the same tokens."""
    if isinstance(position_buckets, bool) or not isinstance(position_buckets, int) or position_buckets < 0:
        raise ValueError(f"position_buckets must be an integer >= 0 (0: no position logits), got {position_buckets!r}")
    own = [index for index, flag in enumerate(own_tokenizer) if flag]
    if position_buckets and own:
        raise ValueError(f"position_buckets={position_buckets} needs every augmenting model to read the anchor's "
                         f"tokens: augmenting models {own} have a tokenizer of their own, so their positions are "
                         f"not the anchor's; set it to 0")


def build_calm(anchor: nn.Module, augments: Sequence[nn.Module] | None, augment_shapes: Sequence[ModelShape],
               connections: Sequence[Sequence[tuple[int, int]]], *, relative_scale: bool = False,
               seed: int | None = None, own_tokenizer: Sequence[bool] | None = None,
               position_buckets: int = 0, aligned_logit: float = ALIGNED_LOGIT) -> CALMModel:
    """The one constructor every path uses: the single-process model, every anchor rank (``augments=None``:
    their states arrive over the wire) and every export. ``connections`` holds one resolved list of pairs
    per augmenting model. With ``seed``, the bridges' initial weights depend on it alone, not on the
    global RNG."""
    def build():
        return CALMModel(anchor, None if augments is None else list(augments), [list(p) for p in connections],
                         list(augment_shapes), relative_scale, own_tokenizer, position_buckets, aligned_logit)

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _augment_specs(augment, connections, augment_shape) -> tuple[list, list[list], list[ModelShape]]:
    """CALMModel's arguments in the multi form: (models or Nones, per-model pairs, shapes)."""
    if isinstance(augment_shape, ModelShape):
        if isinstance(augment, (list, tuple)):
            raise ValueError("augment is a list but augment_shape is one ModelShape: give one shape per model")
        return [augment], [[tuple(pair) for pair in connections]], [augment_shape]
    shapes = list(augment_shape)
    augments = [None] * len(shapes) if augment is None else list(augment)
    per_model = [[tuple(pair) for pair in pairs] for pairs in connections]
    if not shapes or not len(augments) == len(per_model) == len(shapes):
        raise ValueError(f"several augmenting models need one model (or None), one list of connections and "
                         f"one ModelShape each: got {len(augments)} models, {len(per_model)} connection lists, "
                         f"{len(shapes)} shapes")
    if len({model is None for model in augments}) != 1:
        raise ValueError("augment: give every augmenting model or none (None: their states come as augment_states)")
    empty = [index for index, pairs in enumerate(per_model) if not pairs]
    if empty:
        raise ValueError(f"augmenting models {empty} have no connections")
    return augments, per_model, shapes


def compose(
    anchor: nn.Module,
    augment: nn.Module | Sequence[nn.Module],
    every_n: int | None = None,
    connections: Sequence[Sequence[int]] | Sequence[Sequence[Sequence[int]]] | None = None,
    relative_scale: bool = False,
    shared_tokenizer: bool | Sequence[bool] = True,
    seed: int | None = None,
    position_buckets: int = 0,
    aligned_logit: float = ALIGNED_LOGIT,
) -> CALMModel:
    """Compose a frozen anchor (m_B) with one or several frozen augmenting models (m_A).

    ``every_n`` taps every n-th augment layer (default 4) and feeds n-evenly spaced anchor layers;
    ``connections`` gives explicit ``(augment_layer, anchor_layer)`` pairs (0-based; anchor -1 =
    after the embeddings). With a list of augmenting models, ``every_n`` applies to each model and
    ``connections`` is one list of pairs per model; bridges are ordered model by model.
    The anchor's layers are wrapped in place. ``relative_scale`` multiplies each bridge's output by
    the anchor's per-token hidden-state RMS there (detached), so one optimizer step perturbs every
    layer by a similar fraction; the default is the paper's plain residual.

    ``shared_tokenizer`` (one flag, or one per augmenting model): True feeds the model the anchor's
    token ids, so both must use one tokenizer (their embedding sizes may differ: models are often
    padded beyond their tokenizer; ``calm_dist.model.alignment.tokenizer_difference`` compares two
    tokenizers). False lets it have its own tokenizer; pass its tokenisation of the same texts to
    forward/step as ``augment_inputs`` (see ``alignment.py``).
    ``seed`` makes the bridges' initial weights depend on it alone (default: the global RNG).
    ``position_buckets`` > 0 (not in the paper; augmenting models that read the anchor's tokens only) gives
    every bridge head a learned logit per distance between anchor and augment position, the last bucket
    for every longer distance, distance 0 starting at ``aligned_logit``: each anchor position starts out
    reading the augment state of its own token.
    """
    several = isinstance(augment, (list, tuple))
    augments = list(augment) if several else [augment]
    if not augments:
        raise ValueError("augment: give at least one augmenting model")
    shares = [shared_tokenizer] * len(augments) if isinstance(shared_tokenizer, bool) else list(shared_tokenizer)
    if len(shares) != len(augments):
        raise ValueError(f"shared_tokenizer: expected one flag per augmenting model ({len(augments)}), "
                         f"got {len(shares)}")
    anchor_shape = model_shape(anchor)
    shapes = [model_shape(model) for model in augments]
    if several:
        per_model = resolve_per_model_connections([shape.num_layers for shape in shapes], anchor_shape.num_layers,
                                                  every_n, connections)
    else:
        per_model = [resolve_connections(shapes[0].num_layers, anchor_shape.num_layers, every_n, connections)]
    return build_calm(anchor, augments, shapes, per_model, relative_scale=relative_scale, seed=seed,
                      own_tokenizer=[not shared for shared in shares], position_buckets=position_buckets,
                      aligned_logit=aligned_logit)
