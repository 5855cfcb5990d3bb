"""Training and evaluating CALM whose augmenting model reads its own tokens (the extended table's
"different tokenizer" row): every D_C batch and every prompt is decoded to text from the anchor's
word-level ids and re-tokenised for the augmenting model, with each token's end offset in that text.
"""
from __future__ import annotations

import copy

import torch
from tokenizers import processors

from calm_dist.model.alignment import decode_with_end_offsets, token_end_offsets
from calm_dist.model.generation import generate_text
from calm_dist.train.evaluate import GenerateFn


def with_bos(tokenizer):
    """A copy of ``tokenizer`` that puts BOS first, as every row the models were trained on starts."""
    bos = tokenizer.bos_token
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)])
    return tokenizer


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


def aligned_inputs(anchor_tokenizer, augment_tokenizer, input_ids, attention_mask):
    """(augment_inputs, anchor_end_offsets) keyword arguments of CALMModel for one anchor batch."""
    texts, ends = anchor_end_offsets(anchor_tokenizer, input_ids, attention_mask)
    augment = token_end_offsets(augment_tokenizer, texts).to(input_ids.device)
    return {"augment_inputs": [augment], "anchor_end_offsets": ends}


def cross_tokenizer_loss_fn(model, anchor_tokenizer, augment_tokenizer):
    """The composition's loss on a D_C batch, the augmenting model reading its own tokens."""

    def loss_fn(batch):
        aligned = aligned_inputs(anchor_tokenizer, augment_tokenizer, batch["input_ids"], batch["attention_mask"])
        return model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     **aligned).loss

    return loss_fn


def cross_tokenizer_generate_fn(model, anchor_tokenizer, augment_tokenizer, pad_id: int, eos_id: int) -> GenerateFn:
    """Greedy generation from left-padded anchor ids: prompts followed by the new tokens (PAD after EOS)."""
    anchor_with_bos = with_bos(anchor_tokenizer)

    def generate(ids, mask, max_new_tokens):
        prompts = [decode_with_end_offsets(anchor_tokenizer, [i for i, m in zip(row, row_mask) if m])[0]
                   for row, row_mask in zip(ids.tolist(), mask.tolist())]
        generated = generate_text(model, anchor_with_bos, [augment_tokenizer], prompts, max_new_tokens,
                                  eos_token_id=eos_id, pad_token_id=pad_id)
        new = torch.full((ids.shape[0], max_new_tokens), pad_id, dtype=ids.dtype)
        for row, tokens in enumerate(generated.new_token_ids):
            new[row, :len(tokens)] = torch.tensor(tokens, dtype=ids.dtype)
        return torch.cat([ids, new], dim=-1)

    return generate

