"""Greedy generation: with a KV cache on each model and incrementally projected bridge keys/values,
or, for augmenting models with their own tokenizers, by re-tokenising the growing text."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from calm_dist.model.alignment import decode_with_end_offsets, token_end_offsets
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


@dataclass
class GeneratedText:
    """Per prompt: the anchor tokens generated, and the decoded text of prompt plus continuation."""

    new_token_ids: list[list[int]]
    texts: list[str]


@torch.no_grad()
def generate_text(
    model,
    anchor_tokenizer,
    augment_tokenizers: Sequence,
    prompts: Sequence[str],
    max_new_tokens: int = 8,
    *,
    eos_token_id=_FROM_CONFIG,
    pad_token_id=_FROM_CONFIG,
) -> GeneratedText:
    """Greedy decoding for augmenting models with their own tokenizers (one entry per augmenting
    model; None = it shares the anchor's tokenizer and reads the anchor's ids).

    The anchor keeps its own tokens: the prompt's tokenisation followed by the generated ids. Every
    step decodes them to text (``decode_with_end_offsets``: special tokens skipped, tokenization
    spaces not cleaned up), re-tokenises that text with each augmenting tokenizer and recomputes the
    whole forward without caches, so each step is an ordinary aligned forward. The augmenting
    models therefore see the anchor tokenizer's decoded text, prompt included: where it does not
    round-trip a prompt exactly (normalisation, dropped or added spaces), they read the decoded form.
    A row stops after ``eos_token_id`` (None = never); EOS and PAD default to the anchor config's.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if len(augment_tokenizers) != len(model.augment_shapes):
        raise ValueError(f"augment_tokenizers: expected {len(model.augment_shapes)} entries (one per augmenting "
                         f"model, None = the anchor's tokenizer), got {len(augment_tokenizers)}")
    eos_token_id = _resolve_special(model, "eos_token_id", eos_token_id)
    pad_token_id = _resolve_special(model, "pad_token_id", pad_token_id)
    rows = [list(anchor_tokenizer(prompt)["input_ids"]) for prompt in prompts]
    empty = [index for index, row in enumerate(rows) if not row]
    if empty:
        raise ValueError(f"prompts {empty} tokenise to no anchor tokens: nothing to continue from")
    new_ids: list[list[int]] = [[] for _ in rows]
    live = list(range(len(rows)))
    for _ in range(max_new_tokens):
        if not live:
            break
        next_ids = _aligned_next_tokens(model, anchor_tokenizer, augment_tokenizers, [rows[i] for i in live],
                                        0 if pad_token_id is None else pad_token_id)
        for row, token in zip(live, next_ids):
            rows[row].append(token)
            new_ids[row].append(token)
        live = [row for row, token in zip(live, next_ids) if token != eos_token_id]
    return GeneratedText(new_ids, [decode_with_end_offsets(anchor_tokenizer, row)[0] for row in rows])


def _aligned_next_tokens(model, anchor_tokenizer, augment_tokenizers, rows: list[list[int]], pad_id: int):
    """The greedy next anchor token of each row, from one full aligned forward."""
    device = next(model.anchor.parameters()).device
    decoded = [decode_with_end_offsets(anchor_tokenizer, row) for row in rows]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    ends = torch.zeros((len(rows), width), dtype=torch.long)
    for index, (row, (_, row_ends)) in enumerate(zip(rows, decoded)):
        span = slice(width - len(row), width)  # left padding: every row's last token is at -1
        ids[index, span], mask[index, span] = torch.tensor(row), 1
        ends[index, span] = torch.tensor(row_ends)
    texts = [text for text, _ in decoded]
    augment_inputs = [None if tokenizer is None else token_end_offsets(tokenizer, texts)
                      for tokenizer in augment_tokenizers]
    logits = model.step(ids.to(device), mask.to(device), augment_inputs=augment_inputs,
                        anchor_end_offsets=ends.to(device), logits_to_keep=1).logits
    return logits[:, -1].argmax(dim=-1).tolist()
