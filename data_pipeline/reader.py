"""Deterministic, rank-sharded, resumable batches over a tokenised split."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow.compute as pc
import torch

from .shards import IGNORE_INDEX, load_split

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
    """Batches of one split for one rank; an iterator whose position is its state.

    Epoch ``e`` visits the rows in ``epoch_order(num_rows, seed, e, shuffle)``; its global
    batches are consecutive chunks of ``batch_size * world_size`` rows and rank ``r`` takes
    the ``r``-th ``batch_size`` slice of each. With ``drop_last=False`` the last global batch
    is completed with rows from the start of the epoch order (as torch's
    DistributedSampler does), so every rank gets ``batch_size`` rows at every step.
    """

    STATE_KEYS = ("epoch", "batch_in_epoch", "rows_in_epoch", "seed", "shuffle", "num_rows")

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        split: str,
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
        expected_tokenizer_hash: str | None = None,
        vocab_size: int | None = None,
    ):
        _check_reader_args(batch_size, rank, world_size, seed, epochs)
        _check_padding_side(padding_side)
        table, self.manifest = load_split(
            dataset_dir, split, expected_tokenizer_hash=expected_tokenizer_hash,
            vocab_size=vocab_size,
        )
        self.split, self.batch_size = split, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.drop_last, self.epochs = seed, shuffle, drop_last, epochs
        self.padding_side, self.pad_id = padding_side, pad_id
        self.num_rows = table.num_rows
        lengths = pc.list_value_length(table.column("input_ids")).to_numpy()
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._ids = pc.list_flatten(table.column("input_ids")).to_numpy()
        self._labels = pc.list_flatten(table.column("labels")).to_numpy()
        if drop_last and self.num_rows < self.global_batch_size:
            raise ValueError(
                f"split {split!r} has {self.num_rows} rows, fewer than batch_size * "
                f"world_size = {self.global_batch_size}; lower batch_size or pass drop_last=False"
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
        return collate_rows(
            [self._ids[self._offsets[i] : self._offsets[i + 1]] for i in rows],
            [self._labels[self._offsets[i] : self._offsets[i + 1]] for i in rows],
            self.pad_id,
            self.padding_side,
        )

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
            "split": self.split,
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
