"""Evaluation in one process: eval loss, perplexity and teacher-forced exact match of any causal LM
(a composed model, or a base model alone) on tokenised evaluation sets."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import torch

import data_pipeline as dp
from calm_dist.model.alignment import batch_alignment
from calm_dist.model.loss import TokenStatistics, predicting_positions, token_statistics
from calm_dist.reports import EvalReport, EvalTotals

BatchStatistics = Callable[[dict], TokenStatistics]


def totals_of(statistics: TokenStatistics) -> EvalTotals:
    return EvalTotals(float(statistics.loss_sum.detach()), statistics.tokens, statistics.exact_rows, statistics.rows)


def calm_statistics(model, augment_columns: Sequence[str | None] = ()) -> BatchStatistics:
    """Statistics of a composed model (``CALMModel``) on one batch. ``augment_columns``: per augmenting model, the
    batch's tokenisation it reads (``batch_alignment``); empty = every model reads the anchor's ids."""
    def statistics(batch: dict) -> TokenStatistics:
        return model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     logits_for="labels", row_weight=batch.get("row_weight"),
                     **batch_alignment(batch, augment_columns)).statistics

    return statistics


def causal_lm_statistics(model) -> BatchStatistics:
    """Statistics of a plain Hugging Face causal LM on one batch (logits only where they are scored)."""
    def statistics(batch: dict) -> TokenStatistics:
        positions = predicting_positions(batch["labels"], batch["attention_mask"])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[positions]
        return token_statistics(logits, batch["labels"], positions, batch.get("row_weight"))

    return statistics


@torch.no_grad()
def evaluate_set(statistics: BatchStatistics, directory: str | Path, name: str, batch_size: int, pad_id: int,
                 step: int = 0, layout: dp.BatchLayout = dp.BatchLayout()) -> EvalReport:
    """``layout``: what the batches carry; a composition with augmenting models of their own tokenizers needs
    ``dp.anchor_layout(data.augment_columns, data.pad_ids)`` (and ``calm_statistics(model, data.augment_columns)``)."""
    started = time.perf_counter()
    batches = dp.EvalBatches(directory, batch_size, pad_id=pad_id, layout=layout)
    totals = EvalTotals()
    for index in range(len(batches)):
        totals = totals.add(totals_of(statistics(batches.batch(index))))
    return EvalReport(step, name, totals, time.perf_counter() - started)
