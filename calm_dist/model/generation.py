"""Greedy generation with a KV cache on each model and incrementally projected bridge keys/values."""
from __future__ import annotations

import torch

from calm_dist.model.masks import to_left_padding


_FROM_CONFIG = object()


def _resolve_special(model, name: str, given):
    """The anchor config's token id unless the caller gave one (None = no such token)."""
    return getattr(model.anchor.config, name, None) if given is _FROM_CONFIG else given


@torch.no_grad()
def greedy_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 8,
    *,
    eos_token_id=_FROM_CONFIG,
    pad_token_id=_FROM_CONFIG,
    use_cache: bool = True,
) -> torch.Tensor:
    """Greedy decoding. Returns the prompts (re-packed to left padding) followed by the new tokens.

    EOS and PAD default to the anchor config's; ``eos_token_id=None`` never stops early.
    After a row emits ``eos_token_id`` it is padded with ``pad_token_id``. ``use_cache=False``
    recomputes the whole sequence every step (the reference the cached path is tested against).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    eos_token_id = _resolve_special(model, "eos_token_id", eos_token_id)
    pad_token_id = _resolve_special(model, "pad_token_id", pad_token_id)
    pad_token_id = 0 if pad_token_id is None else pad_token_id
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ids, mask = to_left_padding(input_ids, attention_mask, pad_token_id)
    caches = model.new_caches() if use_cache else None
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    step_ids = ids
    for _ in range(max_new_tokens):
        if caches is None:
            step_ids = ids
        logits = model.step(step_ids, mask, caches=caches, logits_to_keep=1).logits[:, -1]
        next_token = logits.argmax(dim=-1)
        was_finished = finished.clone()
        if eos_token_id is not None:
            next_token = torch.where(was_finished, torch.full_like(next_token, pad_token_id), next_token)
            finished |= next_token == eos_token_id
        ids = torch.cat([ids, next_token[:, None]], dim=-1)
        mask = torch.cat([mask, (~was_finished).long()[:, None]], dim=-1)
        step_ids = next_token[:, None]
        if eos_token_id is not None and bool(finished.all()):
            break
    return ids
