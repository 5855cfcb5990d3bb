"""Which augment layer feeds which anchor layer.

A connection ``(a, b)`` taps the output of augment decoder layer ``a`` and adds a cross-attention
residual to the output of anchor decoder layer ``b`` (what anchor layer ``b + 1`` reads).
``b = -1`` means the anchor's embedding output, i.e. the input of anchor layer 0.
"""
from __future__ import annotations

from typing import Sequence

Connection = tuple[int, int]


def every_n_connections(augment_layers: int, anchor_layers: int, every_n: int) -> list[Connection]:
    """The paper's choice: every n-th augment layer, n-evenly spaced anchor layers at the same depth.

    The i-th tapped augment layer is ``(i + 1) * every_n - 1``; it feeds the anchor layer at the same
    relative depth, ``round((i + 1) * anchor_layers / count) - 1``.
    """
    if not isinstance(every_n, int) or isinstance(every_n, bool):
        raise ValueError(f"every_n must be an integer, got {every_n!r}")
    if not 1 <= every_n <= augment_layers:
        raise ValueError(
            f"every_n={every_n} is out of range: the augmenting model has {augment_layers} "
            f"decoder layers, so every_n must be in [1, {augment_layers}]"
        )
    count = augment_layers // every_n
    pairs = []
    for i in range(count):
        augment_layer = (i + 1) * every_n - 1
        anchor_layer = max(0, round((i + 1) * anchor_layers / count) - 1)
        pairs.append((augment_layer, anchor_layer))
    return pairs


def validate_connections(
    connections: Sequence[Sequence[int]], augment_layers: int, anchor_layers: int
) -> list[Connection]:
    """Explicit pairs, checked; many-to-one and one-to-many are allowed, duplicates are not."""
    if len(connections) == 0:
        raise ValueError("connections is empty: give at least one (augment_layer, anchor_layer) pair")
    checked: list[Connection] = []
    for index, pair in enumerate(connections):
        if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
            raise ValueError(f"connections[{index}] = {pair!r}: expected (augment_layer, anchor_layer) ints")
        augment_layer, anchor_layer = int(pair[0]), int(pair[1])
        if not 0 <= augment_layer < augment_layers:
            raise ValueError(
                f"connections[{index}] = {tuple(pair)}: augment layer {augment_layer} is out of range "
                f"[0, {augment_layers - 1}] (the augmenting model has {augment_layers} layers)"
            )
        if not -1 <= anchor_layer < anchor_layers:
            raise ValueError(
                f"connections[{index}] = {tuple(pair)}: anchor layer {anchor_layer} is out of range "
                f"[-1, {anchor_layers - 1}] (the anchor has {anchor_layers} layers; -1 = embeddings)"
            )
        if (augment_layer, anchor_layer) in checked:
            raise ValueError(f"connections[{index}] = {tuple(pair)} is listed twice")
        checked.append((augment_layer, anchor_layer))
    return checked


def resolve_connections(
    augment_layers: int,
    anchor_layers: int,
    every_n: int | None = None,
    connections: Sequence[Sequence[int]] | None = None,
) -> list[Connection]:
    if connections is not None and every_n is not None:
        raise ValueError("give either every_n or connections, not both")
    if connections is not None:
        return validate_connections(connections, augment_layers, anchor_layers)
    return every_n_connections(augment_layers, anchor_layers, 4 if every_n is None else every_n)


def resolve_per_model_connections(
    augment_layer_counts: Sequence[int],
    anchor_layers: int,
    every_n: int | None = None,
    connections: Sequence[Sequence[Sequence[int]]] | None = None,
) -> list[list[Connection]]:
    """One checked list of pairs per augmenting model: ``every_n`` applied to each model, or
    ``connections`` holding one list of ``(augment_layer, anchor_layer)`` pairs per model."""
    count = len(augment_layer_counts)
    if connections is not None:
        if every_n is not None:
            raise ValueError("give either every_n or connections, not both")
        if not _is_list_of(connections, _is_list_of_pairs) or len(connections) != count:
            raise ValueError(
                f"connections: with {count} augmenting models, give one list of (augment_layer, anchor_layer) "
                f"pairs per model ({count} lists), got {connections!r}"
            )
    per_model = []
    for index, layers in enumerate(augment_layer_counts):
        pairs = None if connections is None else connections[index]
        try:
            per_model.append(resolve_connections(layers, anchor_layers, every_n, pairs))
        except ValueError as error:
            raise ValueError(f"augmenting model {index}: {error}") from None
    return per_model


def _is_list_of(value, predicate) -> bool:
    return isinstance(value, (list, tuple)) and all(predicate(item) for item in value)


def _is_list_of_pairs(value) -> bool:
    return _is_list_of(value, lambda pair: isinstance(pair, (list, tuple)))
