"""Position ids and the causal, padding-aware cross-attention mask."""
from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cross_attention_allowed(augment_mask: torch.Tensor, query_start: int, query_len: int) -> torch.Tensor:
    """[B, 1, Q, S] bool: anchor position t may read augment position s iff s <= t and s is not padding.

    Both models read the same padded sequence, so t and s are indices into that sequence;
    queries are positions ``query_start .. query_start + query_len - 1``.
    """
    seq_len = augment_mask.shape[-1]
    device = augment_mask.device
    query_idx = torch.arange(query_start, query_start + query_len, device=device)
    key_idx = torch.arange(seq_len, device=device)
    causal = key_idx[None, :] <= query_idx[:, None]
    return causal[None, None] & augment_mask.bool()[:, None, None, :]


def to_left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int):
    """Move each row's real tokens to the right end (generation appends after the last token)."""
    lengths = attention_mask.long().sum(-1)
    width = input_ids.shape[-1]
    order = torch.argsort(attention_mask.long(), dim=-1, stable=True)
    packed_ids = torch.gather(input_ids, -1, order)
    packed_mask = torch.arange(width, device=input_ids.device)[None, :] >= (width - lengths)[:, None]
    packed_ids = packed_ids.masked_fill(~packed_mask, pad_id)
    return packed_ids, packed_mask.long()
