"""Greedy generation: with a KV cache on each model and each bridge's growing memory of augment states;
for augmenting models with their own tokenizers, by re-tokenising the growing text every step and keeping
each cache for the prefix of tokens the re-tokenisation left unchanged."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from calm_dist.model.alignment import (AugmentInput, decode_text, decode_with_end_offsets, ends_in_text,
                                       token_end_offsets)
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
    """Per prompt: the anchor tokens generated, and the decoded text of prompt plus continuation. ``work``:
    positions each model computed (anchor first, then each augmenting model), summed over prompts and steps."""

    new_token_ids: list[list[int]]
    texts: list[str]
    work: list[int] = field(default_factory=list)


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
    use_cache: bool = True,
) -> GeneratedText:
    """Greedy decoding for augmenting models with their own tokenizers (one entry per augmenting
    model; None = it shares the anchor's tokenizer and reads the anchor's ids).

    The anchor keeps its own tokens: the prompt's tokenisation followed by the generated ids. Every
    step decodes them to text (``decode_with_end_offsets``: special tokens skipped, tokenization
    spaces not cleaned up) and re-tokenises that text with each augmenting tokenizer, so each step
    is an ordinary aligned forward over the text so far. The augmenting models therefore see the
    anchor tokenizer's decoded text, prompt included: where it does not round-trip a prompt exactly
    (normalisation, dropped or added spaces), they read the decoded form.

    ``use_cache`` (each prompt on its own, batch 1): every model keeps its KV cache and every bridge its
    augment states for as long as what they were computed from is unchanged. A re-tokenisation
    that only appends tokens (character- or chunk-level tokenizers) keeps an augmenting model's whole
    cache; one that re-cuts its last tokens (BPE merging across the new text) keeps the unchanged prefix
    and recomputes from the first changed token, and anchor positions that could read a changed augment
    token (their reach is at least its reach, in the old or the new cut) or whose own end offset moved
    are recomputed too. The result equals ``use_cache=False``, which recomputes the whole aligned
    forward of every row at every step (batched, left-padded; the reference).
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
    work = [0] * (1 + len(augment_tokenizers))
    if use_cache:
        for index, row in enumerate(rows):
            cached = AlignedCaches(model, anchor_tokenizer, augment_tokenizers, index)
            for _ in range(max_new_tokens):
                token = int(cached.next_logits(row).argmax())
                row.append(token)
                new_ids[index].append(token)
                if token == eos_token_id:
                    break
            work = [total + count for total, count in zip(work, cached.work)]
        return GeneratedText(new_ids, [decode_with_end_offsets(anchor_tokenizer, row)[0] for row in rows], work)
    live = list(range(len(rows)))
    for _ in range(max_new_tokens):
        if not live:
            break
        next_ids, counts = _aligned_next_tokens(model, anchor_tokenizer, augment_tokenizers, [rows[i] for i in live],
                                                0 if pad_token_id is None else pad_token_id)
        work = [total + count for total, count in zip(work, counts)]
        for row, token in zip(live, next_ids):
            rows[row].append(token)
            new_ids[row].append(token)
        live = [row for row, token in zip(live, next_ids) if token != eos_token_id]
    return GeneratedText(new_ids, [decode_with_end_offsets(anchor_tokenizer, row)[0] for row in rows], work)


def _aligned_next_tokens(model, anchor_tokenizer, augment_tokenizers, rows: list[list[int]], pad_id: int):
    """(The greedy next anchor token of each row, positions each model computed), from one full aligned forward."""
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
    counts = [int(mask.sum())] + [int(mask.sum()) if own is None else int(own.attention_mask.sum())
                                  for own in augment_inputs]
    return logits[:, -1].argmax(dim=-1).tolist(), counts


def _common_prefix(first: Sequence, second: Sequence) -> int:
    count = 0
    for a, b in zip(first, second):
        if a != b:
            break
        count += 1
    return count


def _reach_at(ends: Sequence[int], position: int) -> float:
    """How far into the text position ``position`` has read (infinite past the end: no such position)."""
    return max(ends[: position + 1]) if position < len(ends) else math.inf


def _crop(cache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _crop_memory(bridge_cache, length: int) -> None:
    """A bridge's memory of augment states (``BridgeMemory``, HF's crop convention) to its first ``length``."""
    extra = bridge_cache.length - length
    if extra > 0:
        bridge_cache.crop(-extra)


class AlignedCaches:
    """One text's caches across tokenizers, with what they were computed from: the anchor tokens' end
    offsets and each own-tokenizer model's tokens (ids and end offsets). ``next_logits(row)`` gives the
    next-token logits after the anchor tokens ``row`` (the previous call's row plus new tokens), rerunning
    only what changed (see ``generate_text``)."""

    def __init__(self, model, anchor_tokenizer, augment_tokenizers: Sequence, prompt_index: int = 0):
        self.model, self.anchor_tokenizer = model, anchor_tokenizer
        self.tokenizers = list(augment_tokenizers)
        self.prompt_index = prompt_index
        self.caches = model.new_caches()
        self.anchor_ends: list[int] = []
        self.prefix_texts: list[str] = []  # the decoding of the first k + 1 anchor tokens, k = 0, 1, ...
        self.augment_tokens: list[list[tuple[int, int]]] = [[] for _ in self.tokenizers]
        self.row: list[int] = []
        self.work = [0] * (1 + len(self.tokenizers))  # positions computed: anchor, then each augmenting model
        self.device = next(model.anchor.parameters()).device

    def next_logits(self, row: list[int]) -> torch.Tensor:
        if len(row) <= len(self.anchor_ends):
            raise ValueError(f"next_logits: {len(row)} anchor tokens, but {len(self.anchor_ends)} were computed "
                             "already: give the same row with new tokens appended")
        if row[:len(self.prefix_texts)] != self.row[:len(self.prefix_texts)]:
            raise ValueError("next_logits: give the row of the previous call with new tokens appended")
        self.prefix_texts += [decode_text(self.anchor_tokenizer, row[:count])
                              for count in range(len(self.prefix_texts) + 1, len(row) + 1)]
        self.row = list(row)
        text = decode_text(self.anchor_tokenizer, row)
        ends = ends_in_text(self.prefix_texts, text)  # as decode_with_end_offsets, one new decoding per token
        anchor_reach = list(itertools.accumulate(ends, max))
        keep = _common_prefix(self.anchor_ends, ends)  # cached anchor positions whose end offset is unchanged
        tokens, kept = [], []
        for index, tokenizer in enumerate(self.tokenizers):
            if tokenizer is None:
                tokens.append(None)
                kept.append(None)
                continue
            encoded = tokenizer(text, return_offsets_mapping=True)
            new = [(int(i), int(end)) for i, (_, end) in zip(encoded["input_ids"], encoded["offset_mapping"])]
            if not new:
                raise ValueError(f"prompt {self.prompt_index}: augmenting model {index}'s tokenizer gives no token "
                                 f"for its text {text!r}")
            old = self.augment_tokens[index]
            same = _common_prefix(old, new)
            # Anchor positions reaching as far as the first re-cut augment token (old or new) read it.
            changed_at = min(_reach_at([end for _, end in old], same), _reach_at([end for _, end in new], same))
            keep = next((t for t in range(keep) if anchor_reach[t] >= changed_at), keep)
            tokens.append(new)
            kept.append(same)
        self._crop(keep, kept)
        inputs = [None if own is None else AugmentInput(torch.tensor([[i for i, _ in own]], device=self.device),
                                                        torch.ones(1, len(own), dtype=torch.long, device=self.device),
                                                        torch.tensor([[e for _, e in own]], device=self.device))
                  for own in tokens]
        mask = torch.ones(1, len(row), dtype=torch.long, device=self.device)
        logits = self.model.step(torch.tensor([row[keep:]], device=self.device), mask, caches=self.caches,
                                 augment_inputs=inputs, anchor_end_offsets=torch.tensor([ends], device=self.device),
                                 logits_to_keep=1).logits
        self.work[0] += len(row) - keep
        for index, (own, same) in enumerate(zip(tokens, kept)):
            self.work[index + 1] += len(row) - keep if own is None else len(own) - same
            if own is not None:
                self.augment_tokens[index] = own
        self.anchor_ends = ends
        return logits[0, -1]

    def _crop(self, keep: int, kept: list[int | None]) -> None:
        """Anchor (and shared-tokenizer models) to ``keep`` positions, each own-tokenizer model to its kept prefix."""
        _crop(self.caches.anchor, keep)
        lengths = [keep if same is None else same for same in kept]
        for cache, length in zip(self.caches.augments, lengths):
            _crop(cache, length)
        for bridge_cache, source in zip(self.caches.bridges, self.model.bridge_sources):
            _crop_memory(bridge_cache, lengths[source])
