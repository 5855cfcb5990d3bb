"""Rows beyond the paper, trained on D_C with the composition's budget like the baselines:

- ``calm_two_augments``: CALM over m_B and two augmenting models with m_A's architecture, each
  trained on KV-Substitution over one half of the keys (neither knows every key);
- ``calm_different_tokenizer``: CALM over m_B and an m_A that reads characters (its own tokenizer)
  while m_B reads words; bridges see only m_A tokens that end where the anchor token ends or before.
"""
from __future__ import annotations

from pathlib import Path

import torch

import data_pipeline as dp
from calm_dist.config import Config
from calm_dist.model.composed import compose
from calm_dist.train.augment_variants import (
    KEY_SUBSTITUTION_EVAL,
    character_task_data,
    ensure_augment_variant,
    half_key_task_data,
)
from calm_dist.train.base_models import load_pretrained, weights_checksum
from calm_dist.train.composition import Evaluator, compose_kwargs, connection_kwargs, train_on_composition_set
from calm_dist.train.cross_tokenizer import cross_tokenizer_generate_fn, cross_tokenizer_loss_fn, with_bos
from calm_dist.train.evaluate import calm_generate_fn, hf_generate_fn
from calm_dist.train.pretrain import pretrain_summary
from calm_dist.train.task_data import TaskData

TWO_AUGMENTS, DIFFERENT_TOKENIZER = "calm_two_augments", "calm_different_tokenizer"


def _augment_details(path: Path, **extra) -> dict:
    return {"path": str(path), "sha256": weights_checksum(path), **pretrain_summary(path), **extra}


def _per_model_connections(config: Config, count: int) -> dict:
    pairs = connection_kwargs(config)
    if "connections" in pairs:
        return {"connections": [pairs["connections"]] * count}
    return pairs


def compose_two_augments(config: Config, model_dirs: dict[str, Path], task_data: TaskData):
    """m_B composed with one m_A per half of the keys (each trained and cached on first use)."""
    halves = half_key_task_data(config, task_data)
    paths = [ensure_augment_variant(config, half) for half in halves]
    augments = [load_pretrained(path, f"augment (half {index} of the keys)") for index, path in enumerate(paths)]
    torch.manual_seed(config.run.seed + 4)
    model = compose(load_pretrained(model_dirs["anchor"], "anchor"), augments,
                    relative_scale=config.composition.relative_scale, **_per_model_connections(config, 2))
    details = {"augments": [_augment_details(path, keys=halves[index].manifest["metadata"]["variant"])
                            for index, path in enumerate(paths)]}
    return model, details


def run_two_augments(config: Config, task_data: TaskData, model_dirs: dict[str, Path], evaluator: Evaluator,
                     train_logged, evaluate) -> tuple[dict, dict]:
    model, details = compose_two_augments(config, model_dirs, task_data)

    def loss_fn(batch):
        return model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    model.train()
    train_logged(TWO_AUGMENTS, lambda logger: train_on_composition_set(
        loss_fn, model.trainable_parameters(), config, task_data, logger, description="CALM (2 augmenting models)"))
    model.eval()
    details["trainable_parameters"] = sum(p.numel() for p in model.trainable_parameters())
    return evaluate(calm_generate_fn(model, evaluator.pad, evaluator.eos), TWO_AUGMENTS), details


def run_different_tokenizer(config: Config, task_data: TaskData, model_dirs: dict[str, Path], evaluator: Evaluator,
                            train_logged, evaluate) -> tuple[dict, dict]:
    """CALM whose m_A was trained on the same KV-Substitution texts, tokenised per character."""
    char_data = character_task_data(config, task_data)
    path = ensure_augment_variant(config, char_data)
    augment = load_pretrained(path, "augment (characters)")
    char_alone = Evaluator(config, char_data, evaluator.show_progress).accuracy(
        hf_generate_fn(augment, evaluator.pad, evaluator.eos), KEY_SUBSTITUTION_EVAL, "m_A (characters)")
    torch.manual_seed(config.run.seed + 4)
    model = compose(load_pretrained(model_dirs["anchor"], "anchor"), augment, shared_tokenizer=False,
                    **compose_kwargs(config))
    anchor_tokenizer = dp.load_tokenizer(task_data.tokenizer_dir)
    augment_tokenizer = with_bos(dp.load_tokenizer(char_data.tokenizer_dir))
    loss_fn = cross_tokenizer_loss_fn(model, anchor_tokenizer, augment_tokenizer)
    model.train()
    train_logged(DIFFERENT_TOKENIZER, lambda logger: train_on_composition_set(
        loss_fn, model.trainable_parameters(), config, task_data, logger, description="CALM (different tokenizer)"))
    model.eval()
    generate = cross_tokenizer_generate_fn(model, anchor_tokenizer, augment_tokenizer, evaluator.pad, evaluator.eos)
    details = {"augment": _augment_details(path, tokenizer="characters", vocab_size=char_data.vocab_size,
                                           kv_substitution_alone=char_alone),
               "trainable_parameters": sum(p.numel() for p in model.trainable_parameters())}
    return evaluate(generate, DIFFERENT_TOKENIZER), details
