"""Deterministic, rank-sharded, resumable batches over a tokenised dataset directory.

Kept instead of a ``DataLoader`` + ``DistributedSampler``: every role of a distributed run (anchor
ranks and the augment stages that feed them) must read exactly the same rows in the same order, and an
elastic restart must resume mid-epoch at another rank count from a small JSON state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

IGNORE_INDEX = -100
PADDING_SIDES = ("left", "right")


def _check_padding_side(padding_side: str) -> None:
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")


def pad_batch(
    rows: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``rows`` to the longest one: (LongTensor[B, T] values, LongTensor[B, T] mask)."""
    _check_padding_side(padding_side)
    if not rows:
        raise ValueError("pad_batch needs at least one row")
    width = max(len(row) for row in rows)
    values = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for index, row in enumerate(rows):
        start = width - len(row) if padding_side == "left" else 0
        values[index, start : start + len(row)] = row
        mask[index, start : start + len(row)] = 1
    return torch.from_numpy(values), torch.from_numpy(mask)


def collate_prompts(
    prompts: Sequence[Sequence[int]], pad_id: int, padding_side: str = "left"
) -> dict[str, torch.Tensor]:
    """Generation inputs: ``input_ids`` and ``attention_mask``, left-padded by default."""
    input_ids, attention_mask = pad_batch(prompts, pad_id, padding_side)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate_rows(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_id: int,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Training inputs: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    padded_ids, attention_mask = pad_batch(input_ids, pad_id, padding_side)
    padded_labels, _ = pad_batch(labels, IGNORE_INDEX, padding_side)
    return {"input_ids": padded_ids, "attention_mask": attention_mask, "labels": padded_labels}


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Row order of ``epoch``: a permutation from ``default_rng([seed, epoch])`` or identity."""
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


@dataclass(frozen=True)
class BatchLayout:
    """What a reader's batches carry.

    - ``anchor``: the anchor's tokens: ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding);
    - ``end_offsets``: also each anchor token's end offset in its row's text (``end_offsets``, 0 on padding);
    - ``tokenisations``: (name, pad id) of other tokenisations of the same rows (``prepare_data``'s
      ``<name>_*`` columns): ``<name>_input_ids``, ``<name>_attention_mask``, ``<name>_end_offsets``.

    Every tokenisation is padded on the right to its own longest row in the batch.
    """

    anchor: bool = True
    end_offsets: bool = False
    tokenisations: tuple[tuple[str, int], ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        columns = ("input_ids", "labels") if self.anchor else ()
        if self.end_offsets:
            columns += ("end_offsets",)
        for name, _ in self.tokenisations:
            columns += (f"{name}_input_ids", f"{name}_end_offsets")
        return columns


def anchor_layout(augment_columns: Sequence[str | None], pad_ids: Mapping[str, int]) -> BatchLayout:
    """An anchor rank's batches: its tokens and, when some augmenting model reads its own tokenisation
    (``augment_columns``: per model, its tokenisation's name or None), their offsets and every such
    tokenisation (for the cross-attention mask)."""
    names = sorted({name for name in augment_columns if name is not None})
    return BatchLayout(True, bool(names), tuple((name, pad_ids[name]) for name in names))


def augment_layout(column: str | None, pad_ids: Mapping[str, int]) -> BatchLayout:
    """An augmenting model's batches: its own tokenisation (``column``), or the anchor's tokens (None)."""
    return BatchLayout() if column is None else BatchLayout(False, False, ((column, pad_ids[column]),))


class TokenisedRows:
    """Random access to columns (default ``input_ids`` and ``labels``) of a tokenised dataset (memory-mapped
    Arrow)."""

    def __init__(self, source, columns: Sequence[str] = ("input_ids", "labels")):
        import datasets

        dataset = source if isinstance(source, datasets.Dataset) else datasets.load_from_disk(str(source))
        missing = [name for name in columns if name not in dataset.column_names]
        if missing:
            hint = ("; an augmenting model with its own tokenizer needs data prepared with its tokenizer "
                    "(prepare_data's augment_tokenizers)" if {"input_ids", "labels"} <= set(dataset.column_names)
                    else "; make one with data_pipeline.prepare_data")
            raise ValueError(f"{source}: not a tokenised dataset with columns {sorted(missing)}{hint}")
        self.columns = tuple(columns)
        self.table: pa.Table = dataset.data.table.select(list(self.columns))

    def __len__(self) -> int:
        return self.table.num_rows

    def take(self, rows: Sequence[int]) -> tuple[list[np.ndarray], ...]:
        """Each column's values of ``rows``, in the order of ``self.columns``."""
        chosen = self.table.take(pa.array(np.asarray(rows, dtype=np.int64)))
        columns = []
        for name in self.columns:
            column = chosen.column(name).combine_chunks()
            lengths = pc.list_value_length(column).to_numpy()
            flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
            starts = np.concatenate([[0], np.cumsum(lengths)])
            columns.append([flat[starts[i]:starts[i + 1]] for i in range(len(lengths))])
        return tuple(columns)

    def batch(self, rows: Sequence[int], layout: BatchLayout, pad_id: int, padding_side: str = "right",
              ignore_labels: bool = False) -> dict[str, torch.Tensor]:
        """The padded batch of ``rows`` under ``layout`` (``pad_id``: the anchor's; ``ignore_labels``: every
        label -100, for padding rows)."""
        values = dict(zip(self.columns, self.take(rows)))
        batch: dict[str, torch.Tensor] = {}
        if layout.anchor:
            labels = values["labels"]
            if ignore_labels:
                labels = [np.full_like(row, IGNORE_INDEX) for row in labels]
            batch = collate_rows(values["input_ids"], labels, pad_id, padding_side)
        if layout.end_offsets:
            batch["end_offsets"], _ = pad_batch(values["end_offsets"], 0, padding_side)
        for name, other_pad in layout.tokenisations:
            ids, mask = pad_batch(values[f"{name}_input_ids"], other_pad, padding_side)
            batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"] = ids, mask
            batch[f"{name}_end_offsets"], _ = pad_batch(values[f"{name}_end_offsets"], 0, padding_side)
        return batch


def _check_reader_args(batch_size, rank, world_size, seed, epochs) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be None (forever) or >= 1, got {epochs}")


class ShardedReader:
    """Batches of one tokenised dataset for one rank; an iterator whose position is its state.

    Epoch ``e`` visits the rows in ``epoch_order(num_rows, seed, e, shuffle)``; its global
    batches are consecutive chunks of ``batch_size * world_size`` rows and rank ``r`` takes
    the ``r``-th ``batch_size`` slice of each. With ``drop_last=False`` the last global batch
    is completed with rows from the start of the epoch order (as torch's
    DistributedSampler does), so every rank gets ``batch_size`` rows at every step.
    """

    STATE_KEYS = ("epoch", "batch_in_epoch", "rows_in_epoch", "seed", "shuffle", "num_rows")

    def __init__(
        self,
        dataset,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        padding_side: str = "right",
        pad_id: int = 0,
        drop_last: bool = True,
        epochs: int | None = None,
        layout: BatchLayout = BatchLayout(),
    ):
        _check_reader_args(batch_size, rank, world_size, seed, epochs)
        _check_padding_side(padding_side)
        self.layout = layout
        self.rows = dataset if isinstance(dataset, TokenisedRows) else TokenisedRows(dataset, layout.columns)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last, self.epochs = seed, shuffle, drop_last, epochs
        self.padding_side, self.pad_id = padding_side, pad_id
        self.num_rows = len(self.rows)
        if drop_last and self.num_rows < self.global_batch_size:
            raise ValueError(
                f"the dataset has {self.num_rows} rows, fewer than batch_size * world_size = "
                f"{self.global_batch_size}; lower the batch size or add rows"
            )
        self._epoch, self._batch = 0, 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_rows, self.global_batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    def __iter__(self) -> "ShardedReader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.epochs is not None and self._epoch >= self.epochs:
            raise StopIteration
        rows = self._rank_rows(self._epoch, self._batch)
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        return self.rows.batch(rows, self.layout, self.pad_id, self.padding_side)

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, epoch_order(self.num_rows, self.seed, epoch, self.shuffle))
        return self._order_cache[1]

    def _rank_rows(self, epoch: int, batch: int) -> np.ndarray:
        order = self._order(epoch)
        start = batch * self.global_batch_size
        rows = order[start : start + self.global_batch_size]
        missing = self.global_batch_size - len(rows)
        if missing:
            rows = np.concatenate([rows, order[np.arange(missing) % self.num_rows]])
        return rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        """JSON-able position: the next batch is ``batch_in_epoch`` of ``epoch``."""
        return {
            "epoch": self._epoch,
            "batch_in_epoch": self._batch,
            "rows_in_epoch": self._batch * self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_rows": self.num_rows,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``; any rank may load any rank's state.

        A different global batch size is accepted when the rows already consumed in the
        epoch are a whole number of the new global batches (elastic restarts).
        """
        missing = [key for key in self.STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"reader state lacks {missing}; pass a ShardedReader.state_dict()")
        for key in ("seed", "shuffle", "num_rows"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"reader state has {key}={state[key]!r} but this reader has "
                    f"{key}={getattr(self, key)!r}; build the reader with the same {key} "
                    f"and dataset"
                )
        batch, rest = divmod(int(state["rows_in_epoch"]), self.global_batch_size)
        if rest:
            raise ValueError(
                f"reader state is {state['rows_in_epoch']} rows into epoch {state['epoch']}, "
                f"not a multiple of batch_size * world_size = {self.global_batch_size}; "
                f"resume with a global batch size that divides it"
            )
        if batch > self.batches_per_epoch:
            raise ValueError(f"reader state batch {batch} is past the end of the epoch "
                             f"({self.batches_per_epoch} batches)")
        epoch = int(state["epoch"])
        if batch == self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        self._epoch, self._batch = epoch, batch


class EvalBatches:
    """One rank's share of an evaluation set, in order: global batch ``i`` holds rows
    ``i * G .. (i + 1) * G - 1`` (G = ``batch_size * world_size``) and rank ``r`` the ``r``-th slice. Every
    rank gets the same number of batches (ZeRO-3 ranks must run every forward together): a rank whose
    slice is empty gets one padding row, which ``row_weight`` (0) leaves out of every statistic."""

    def __init__(self, dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, pad_id: int = 0,
                 layout: BatchLayout = BatchLayout()):
        _check_reader_args(batch_size, rank, world_size, 0, None)
        self.layout = layout
        self.rows = dataset if isinstance(dataset, TokenisedRows) else TokenisedRows(dataset, layout.columns)
        self.batch_size, self.rank, self.world_size, self.pad_id = batch_size, rank, world_size, pad_id

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / (self.batch_size * self.world_size))

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"evaluation batch {index} of {len(self)}")
        start = index * self.batch_size * self.world_size + self.rank * self.batch_size
        rows = list(range(start, min(start + self.batch_size, len(self.rows))))
        batch = self.rows.batch(rows or [0], self.layout, self.pad_id, ignore_labels=not rows)
        batch["row_weight"] = torch.full((max(len(rows), 1),), 1 if rows else 0, dtype=torch.long)
        return batch
