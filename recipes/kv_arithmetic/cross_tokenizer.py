"""CALM whose augmenting model reads its own tokens (the "different tokenizer" row): every batch of
anchor ids is decoded to text and re-tokenised for the augmenting model, with each token's end offset
in that text, so the bridges read only augment tokens that end where the anchor token ends or before.
"""
from __future__ import annotations

import torch

from calm_dist.model.alignment import decode_with_end_offsets, token_end_offsets
from calm_dist.train.evaluate import BatchStatistics


def anchor_end_offsets(anchor_tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Each row's text (its real anchor tokens decoded) and every anchor token's end offset in it
    (0 at padding)."""
    ends = torch.zeros_like(input_ids)
    texts = []
    for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
        positions = [index for index, real in enumerate(mask) if real]
        text, row_ends = decode_with_end_offsets(anchor_tokenizer, [ids[index] for index in positions])
        ends[row, positions] = torch.tensor(row_ends, dtype=ends.dtype)
        texts.append(text)
    return texts, ends


def aligned_inputs(anchor_tokenizer, augment_tokenizer, input_ids, attention_mask) -> dict:
    """(augment_inputs, anchor_end_offsets) keyword arguments of CALMModel for one anchor batch."""
    texts, ends = anchor_end_offsets(anchor_tokenizer, input_ids, attention_mask)
    augment = token_end_offsets(augment_tokenizer, texts).to(input_ids.device)
    return {"augment_inputs": [augment], "anchor_end_offsets": ends}


def cross_tokenizer_statistics(model, anchor_tokenizer, augment_tokenizer) -> BatchStatistics:
    """The composed model's statistics on a batch of anchor rows, its augmenting model reading its own tokens."""

    def statistics(batch: dict):
        aligned = aligned_inputs(anchor_tokenizer, augment_tokenizer, batch["input_ids"], batch["attention_mask"])
        return model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     logits_for="labels", row_weight=batch.get("row_weight"), **aligned).statistics

    return statistics
