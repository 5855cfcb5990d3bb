"""Next-token loss over labelled positions (-100 = ignored)."""
from __future__ import annotations

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100


def per_token_loss(logits, labels, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses [B, T-1], valid [B, T-1]) for predicting labels[:, 1:] from logits[:, :-1].

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
