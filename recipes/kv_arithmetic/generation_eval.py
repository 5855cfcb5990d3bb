"""Greedy-generation exact match, the paper's metric, for any model with a generate function."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

GenerateFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def completion(tokens: Sequence[int], eos_id: int) -> list[int] | None:
    """The tokens before the first EOS, or None if the model never stopped."""
    tokens = list(tokens)
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else None


def exact_match(
    generate: GenerateFn,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int,
    batch_size: int = 256,
    max_new_tokens: int = 8,
    description: str = "eval",
    show_progress: bool = True,
) -> float:
    """Percentage of prompts whose greedy completion equals the answer (answer without EOS)."""
    if len(prompts) != len(answers) or not prompts:
        raise ValueError(f"{description}: need as many answers as prompts, and at least one")
    correct = 0
    for start in tqdm(range(0, len(prompts), batch_size), desc=description, disable=not show_progress,
                      leave=False, dynamic_ncols=True):
        batch_prompts = prompts[start:start + batch_size]
        ids, mask = left_pad(batch_prompts, pad_id)
        output = generate(ids, mask, max_new_tokens)[:, ids.shape[1]:]
        for row, answer in enumerate(answers[start:start + batch_size]):
            correct += completion(output[row].tolist(), eos_id) == list(answer)
    return 100.0 * correct / len(prompts)


def hf_generate_fn(model, pad_id: int, eos_id: int) -> GenerateFn:
    """Greedy generation of a plain Hugging Face causal LM (m_A or m_B alone)."""

    @torch.no_grad()
    def generate(ids, mask, max_new_tokens):
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad_id, eos_token_id=eos_id,
        )

    return generate


def calm_generate_fn(model, pad_id: int, eos_id: int) -> GenerateFn:
    def generate(ids, mask, max_new_tokens):
        return model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                              pad_token_id=pad_id, eos_token_id=eos_id)

    return generate
