"""Composing models whose tokenizers differ: each reads the same text through its own tokens.

Every token records the character offset in the text where it ends. A position's *reach* is the
largest end offset among the real tokens up to it: how far into the text its hidden state has read
(a zero-width special token such as BOS reaches no further than the tokens before it). An anchor
token may read an augment position iff that position is not padding and its reach is at most the
anchor token's own reach, so nothing after the anchor token's end can influence it. With one
shared tokenizer this is exactly the index-based mask of ``masks.cross_attention_allowed``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

# Texts on which two tokenizers must agree to count as one (besides equal vocabularies).
PROBE_TEXTS = ("Hello, world! 123 + 45 = 168.", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n",
               "naïve café, 東京, ☃ and emoji 🙂", "def f(x):\n    return x ** 2  # code", "UPPER lower MiXeD")


def tokenizer_difference(anchor, other) -> str | None:
    """Why two tokenizers would give different ids for the same text (None: they are one tokenizer).
    Vocabulary sizes are not compared: a model's embedding may be padded beyond its tokenizer."""
    anchor_vocab, other_vocab = anchor.get_vocab(), other.get_vocab()
    if anchor_vocab != other_vocab:
        only_anchor = sorted(set(anchor_vocab) - set(other_vocab))[:3]
        moved = sorted(t for t in set(anchor_vocab) & set(other_vocab) if anchor_vocab[t] != other_vocab[t])[:3]
        detail = f"tokens only in the anchor's: {only_anchor}" if only_anchor else f"tokens with other ids: {moved}"
        if not only_anchor and not moved:
            detail = f"tokens only in the other: {sorted(set(other_vocab) - set(anchor_vocab))[:3]}"
        return f"their vocabularies differ ({len(anchor_vocab)} vs {len(other_vocab)} entries; {detail})"
    for text in PROBE_TEXTS:
        if anchor(text)["input_ids"] != other(text)["input_ids"]:
            return f"they tokenise {text!r} differently"
    return None


@dataclass
class AugmentInput:
    """One model's own tokenisation of a batch of texts: ids, attention mask, and each token's end
    offset into its text (0 at padding). Shapes ``[B, S]``, padded on the tokenizer's side."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    end_offsets: torch.Tensor

    def __post_init__(self):
        shapes = {tuple(self.input_ids.shape), tuple(self.attention_mask.shape), tuple(self.end_offsets.shape)}
        if len(shapes) != 1 or self.input_ids.dim() != 2:
            raise ValueError(
                "AugmentInput: input_ids, attention_mask and end_offsets must share one [batch, length] shape, "
                f"got {tuple(self.input_ids.shape)}, {tuple(self.attention_mask.shape)}, "
                f"{tuple(self.end_offsets.shape)}"
            )

    def to(self, device) -> AugmentInput:
        return AugmentInput(self.input_ids.to(device), self.attention_mask.to(device), self.end_offsets.to(device))


def token_end_offsets(tokenizer, texts: Sequence[str]) -> AugmentInput:
    """Tokenise ``texts`` (special tokens included, padded to the longest on the tokenizer's padding side, with
    its pad token, else EOS, else 0: a tokenizer need not have a pad token) with the end offset of every
    token, from a Hugging Face fast tokenizer's offset mapping. Padding gets offset 0."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: end offsets need return_offsets_mapping"
        )
    encoded = tokenizer(list(texts), return_offsets_mapping=True)
    width = max(len(ids) for ids in encoded["input_ids"])
    pad = next((token for token in (tokenizer.pad_token_id, tokenizer.eos_token_id) if token is not None), 0)
    ids = torch.full((len(texts), width), pad, dtype=torch.long)  # padding is masked: any id works
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    ends = torch.zeros((len(texts), width), dtype=torch.long)
    for row, (row_ids, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"])):
        span = slice(width - len(row_ids), width) if tokenizer.padding_side == "left" else slice(0, len(row_ids))
        ids[row, span] = torch.tensor(row_ids, dtype=torch.long)
        mask[row, span] = 1
        ends[row, span] = torch.tensor([end for _, end in offsets], dtype=torch.long)
    return AugmentInput(ids, mask, ends)


def batch_alignment(batch: Mapping[str, torch.Tensor], columns: Sequence[str | None], device=None) -> dict:
    """``CALMModel.forward``'s ``augment_inputs`` and ``anchor_end_offsets`` for a batch of pre-tokenised rows
    (as ``data_pipeline``'s readers write them): the anchor tokens' ``end_offsets`` and, per augmenting model
    with its own tokenizer, ``<column>_input_ids``, ``<column>_attention_mask``, ``<column>_end_offsets``.
    ``columns``: per augmenting model, its tokenisation's name, None = it reads the anchor's ids. Empty when
    every model reads the anchor's ids."""
    if all(column is None for column in columns):
        return {}

    def tensor(key: str) -> torch.Tensor:
        if key not in batch:
            raise ValueError(f"the batch has no {key!r}: read it with a layout that carries every augmenting "
                             "tokenisation (data_pipeline.anchor_layout)")
        return batch[key] if device is None else batch[key].to(device)

    inputs = [None if column is None else AugmentInput(tensor(f"{column}_input_ids"),
                                                       tensor(f"{column}_attention_mask"),
                                                       tensor(f"{column}_end_offsets"))
              for column in columns]
    return {"augment_inputs": inputs, "anchor_end_offsets": tensor("end_offsets")}


def reach(end_offsets: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S]: the largest end offset among the real tokens up to each position."""
    return end_offsets.masked_fill(attention_mask == 0, 0).cummax(dim=-1).values


def aligned_allowed(anchor_end: torch.Tensor, augment_end: torch.Tensor, augment_mask: torch.Tensor,
                    query_start: int, query_len: int) -> torch.Tensor:
    """[B, 1, Q, S] bool: anchor position t may read augment position s iff s is not padding and
    reaches no further into the text than t does.

    ``anchor_end`` ``[B, T]`` covers the anchor's whole sequence (0 at its padding); queries are
    anchor positions ``query_start .. query_start + query_len - 1``. ``augment_end`` and
    ``augment_mask`` ``[B, S]`` are the augmenting model's own tokenisation of the same texts.
    """
    if anchor_end.shape[0] != augment_end.shape[0]:
        raise ValueError(f"batch sizes differ: anchor {anchor_end.shape[0]}, augment {augment_end.shape[0]}")
    anchor_reach = anchor_end.cummax(dim=-1).values[:, query_start:query_start + query_len]
    augment_reach = reach(augment_end, augment_mask)
    readable = augment_reach[:, None, :] <= anchor_reach[:, :, None]
    return (readable & augment_mask.bool()[:, None, :])[:, None]


def decode_with_end_offsets(tokenizer, token_ids: Sequence[int]) -> tuple[str, list[int]]:
    """The text of ``token_ids`` and where each token ends in it.

    The text is ``decode(token_ids)`` without special tokens. Token k ends where the decoding of the
    first k + 1 tokens stops agreeing with that text, so a token that completes nothing on its own
    (the first bytes of a multi-byte character, a special token) ends where the one before it did.
    """
    text = decode_text(tokenizer, token_ids)
    prefixes = [decode_text(tokenizer, token_ids[:count]) for count in range(1, len(token_ids) + 1)]
    return text, ends_in_text(prefixes, text)


def ends_in_text(prefix_texts: Sequence[str], text: str) -> list[int]:
    """Token k's end offset in ``text`` from the decoding of the first k + 1 tokens: where it stops agreeing
    with ``text`` (``decode_with_end_offsets``; callers that grow a text keep the prefixes' decodings)."""
    return [len(prefix) if text.startswith(prefix) else len(os.path.commonprefix([prefix, text]))
            for prefix in prefix_texts]


def decode_text(tokenizer, token_ids: Sequence[int]) -> str:
    """The text of ``token_ids`` as alignment reads it: special tokens skipped, spaces not cleaned up."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
