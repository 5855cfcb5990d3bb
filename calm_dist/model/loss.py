"""Next-token loss over labelled positions (-100 = ignored), and the statistics evaluation needs.

Position ``t`` predicts ``labels[:, t + 1]``: only positions whose next label counts need logits at all
(``predicting_positions``), which for prompt/completion data is a small share of the sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100


def per_token_loss(logits, labels, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses [B, T-1], valid [B, T-1]) for predicting labels[:, 1:] from full logits[:, :-1].

    With an attention mask, a prediction made at a padding position does not count.
    """
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    if attention_mask is not None:
        shifted_labels = shifted_labels.masked_fill(attention_mask[:, :-1] == 0, IGNORE_INDEX)
    losses = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shifted_labels.shape)
    return losses, shifted_labels != IGNORE_INDEX


def causal_lm_loss(logits, labels, attention_mask=None) -> torch.Tensor:
    losses, valid = per_token_loss(logits, labels, attention_mask)
    return losses.sum() / valid.sum().clamp(min=1)


def per_example_loss(logits, labels, attention_mask=None) -> torch.Tensor:
    losses, valid = per_token_loss(logits, labels, attention_mask)
    return losses.sum(-1) / valid.sum(-1).clamp(min=1)


def predicting_positions(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] bool: positions whose logits predict a labelled token (the next position's label counts)."""
    following = labels[:, 1:] != IGNORE_INDEX
    if attention_mask is not None:
        following = following & (attention_mask[:, :-1] != 0)
    return F.pad(following, (0, 1), value=False)


@dataclass
class TokenStatistics:
    """Over one batch: summed token loss (differentiable), labelled tokens, rows whose every labelled
    token is the argmax, and rows with at least one labelled token."""

    loss_sum: torch.Tensor
    tokens: int
    exact_rows: int
    rows: int

    @property
    def mean_loss(self) -> torch.Tensor:
        return self.loss_sum / max(self.tokens, 1)


def token_statistics(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
                     row_weight: torch.Tensor | None = None) -> TokenStatistics:
    """Statistics from ``logits`` [N, V] computed at the True entries of ``positions`` [B, T] (row-major
    order, as ``hidden[positions]`` selects them). ``row_weight`` [B] (0 = padding row) excludes rows."""
    rows_of = positions.nonzero()[:, 0]
    targets = labels[:, 1:][positions[:, :-1]]
    if row_weight is not None:
        keep = row_weight.bool()[rows_of]
        logits, targets, rows_of = logits[keep], targets[keep], rows_of[keep]
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    wrong = (logits.argmax(dim=-1) != targets).long()
    batch = labels.shape[0]
    per_row_tokens = torch.zeros(batch, dtype=torch.long, device=labels.device).index_add_(0, rows_of, torch.ones_like(wrong))
    per_row_wrong = torch.zeros(batch, dtype=torch.long, device=labels.device).index_add_(0, rows_of, wrong)
    counted = per_row_tokens > 0
    return TokenStatistics(losses.sum(), int(targets.numel()), int((counted & (per_row_wrong == 0)).sum()),
                           int(counted.sum()))
