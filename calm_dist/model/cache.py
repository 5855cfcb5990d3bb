"""Generation caches of a composed model: both models' KV caches and every bridge's augment states.

All of them grow along the sequence into buffers with spare room (doubled when full), so appending a token
copies that token only, and the cost of a generation step stays flat as the sequence grows (a plain
``torch.cat`` per step copies the whole past every step).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingBuffer:
    """A ``[batch, heads, length, head_dim]`` tensor grown along its length; ``view`` is the filled part."""

    def __init__(self):
        self._storage: torch.Tensor | None = None
        self.length = 0

    @property
    def view(self) -> torch.Tensor | None:
        return None if self._storage is None else self._storage.narrow(2, 0, self.length)

    def append(self, chunk: torch.Tensor) -> torch.Tensor:
        needed = self.length + chunk.shape[2]
        if self._storage is None or needed > self._storage.shape[2]:
            capacity = max(needed, 2 * (0 if self._storage is None else self._storage.shape[2]), 16)
            grown = chunk.new_empty((*chunk.shape[:2], capacity, chunk.shape[3]))
            if self.length:
                grown.narrow(2, 0, self.length).copy_(self._storage.narrow(2, 0, self.length))
            self._storage = grown
        self._storage.narrow(2, self.length, chunk.shape[2]).copy_(chunk)
        self.length = needed
        return self._storage.narrow(2, 0, needed)

    def crop(self, count: int) -> None:
        """Drop the last ``-count`` positions (HF's convention: ``count`` <= 0)."""
        if count > 0:
            raise ValueError(f"crop takes the negative number of positions to drop, got {count}")
        self.length = max(0, self.length + count)

    def replace(self, tensor: torch.Tensor | None) -> None:
        """New contents (after a batch reorder or selection): the tensor becomes the storage."""
        self._storage = None if tensor is None else tensor.contiguous()
        self.length = 0 if tensor is None else tensor.shape[2]


class GrowingLayer(DynamicLayer):
    """Hugging Face's ``DynamicLayer`` (one attention layer's keys/values) on growing buffers."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._keys, self._values = GrowingBuffer(), GrowingBuffer()

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = self._keys.append(key_states), self._values.append(value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._keys.length

    def crop(self, tokens_to_remove: int) -> None:
        if not self.is_initialized:
            return
        self._keys.crop(tokens_to_remove)
        self._values.crop(tokens_to_remove)
        self.keys, self.values = self._keys.view, self._values.view

    def reset(self) -> None:
        super().reset()
        self._keys, self._values = GrowingBuffer(), GrowingBuffer()

    def _rebuffer(self) -> None:
        self._keys.replace(self.keys)
        self._values.replace(self.values)
        self.keys, self.values = self._keys.view, self._values.view

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rebuffer()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rebuffer()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rebuffer()


def growing_cache(config) -> DynamicCache:
    """A model's ``DynamicCache`` (its layer structure from its config) whose full-attention layers grow
    into buffers; sliding-window and other special layers stay Hugging Face's own."""
    cache = DynamicCache(config=config)
    if not cache.layers:  # a config without layer information: layers are created on first use
        cache.layer_class_to_replicate = GrowingLayer
    cache.layers[:] = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class BridgeMemory:
    """What one bridge has read during generation: the augment states ``[batch, 1, length, augment_dim]``
    (grown by each forward's new positions) and its key and value weights folded onto them, made once per
    generation (``folded``). Folded, a step reads augment_dim numbers per cached position instead of the
    2 x anchor_dim of projected keys and values: at long sequences generation is bound by reading caches."""

    def __init__(self):
        self._states = GrowingBuffer()
        self.folded = None

    @property
    def states(self) -> torch.Tensor | None:
        return self._states.view

    @property
    def length(self) -> int:
        return self._states.length

    def extend(self, states: torch.Tensor) -> torch.Tensor:
        return self._states.append(states)

    def crop(self, count: int) -> None:
        self._states.crop(count)

    def _apply(self, function) -> None:
        if self.length:
            self._states.replace(function(self.states))

    def reorder(self, index: torch.Tensor) -> None:
        self._apply(lambda tensor: tensor.index_select(0, index.to(tensor.device)))

    def repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def select(self, indices: torch.Tensor) -> None:
        self._apply(lambda tensor: tensor[indices])


class CALMCache(Cache):
    """What a composed model keeps between generation steps: the anchor's KV cache, each augmenting model's
    (none when their states come from elsewhere) and each bridge's memory of augment states.

    It is a ``transformers.Cache``: ``generate`` reads its length (the anchor's), reorders it for beam
    search and crops it for assisted decoding; each operation applies to every part.
    """

    def __init__(self, anchor: Cache, augments: Sequence[Cache], bridges: Sequence[BridgeMemory]):
        super().__init__(layers=anchor.layers)  # the base class's queries (mask sizes, sliding layers) are the anchor's
        self.anchor = anchor
        self.augments = list(augments)
        self.bridges = list(bridges)

    def _model_caches(self) -> Iterator[Cache]:
        yield self.anchor
        yield from self.augments

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.anchor.update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.anchor.get_seq_length(layer_idx)

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return all(cache.is_croppable for cache in self._model_caches())

    def crop(self, tokens_to_remove: int) -> None:
        for cache in self._model_caches():
            cache.crop(tokens_to_remove)
        for bridge in self.bridges:
            bridge.crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for cache in self._model_caches():
            cache.reorder_cache(beam_idx)
        for bridge in self.bridges:
            bridge.reorder(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for cache in self._model_caches():
            cache.batch_repeat_interleave(repeats)
        for bridge in self.bridges:
            bridge.repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for cache in self._model_caches():
            cache.batch_select_indices(indices)
        for bridge in self.bridges:
            bridge.select(indices)

    def reset(self) -> None:
        for cache in self._model_caches():
            cache.reset()
        self.bridges = [BridgeMemory() for _ in self.bridges]

    def activate_past_recording(self, **kwargs) -> None:
        for cache in self._model_caches():
            cache.activate_past_recording(**kwargs)
