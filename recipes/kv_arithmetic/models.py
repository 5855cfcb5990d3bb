"""The recipe's base models: m_A (KV-Substitution over every key) and m_B (Numeric-Arithmetic), and
the m_A variants of the extra rows, all as pretraining tasks of ``pretrain.py``."""
from __future__ import annotations

from pathlib import Path

from calm_dist.config import Config

from .pretrain import PretrainTask
from .settings import RecipeSettings
from .task_data import (
    ANCHOR_TRAIN,
    AUGMENT_TRAIN,
    KV_SUBSTITUTION,
    NUMERIC_ARITHMETIC,
    TaskFiles,
    max_length,
)


def augment_seed(config: Config) -> int:
    """The seed of m_A's initial weights and batches (every m_A variant starts from the same weights)."""
    return config.run.seed + 1


def anchor_seed(config: Config) -> int:
    return config.run.seed + 2


def augment_task(config: Config, settings: RecipeSettings, files: TaskFiles, *, role: str = "augment",
                 training_file: Path | None = None, eval_set: str = KV_SUBSTITUTION,
                 tokenizer_dir: Path | None = None, longest: int | None = None) -> PretrainTask:
    """m_A, or a model like m_A (architecture, settings, seed) trained on other rows or tokens."""
    return PretrainTask(role, settings.augment, augment_seed(config), training_file or files.path(AUGMENT_TRAIN),
                        files.path(eval_set), tokenizer_dir or files.tokenizer_dir, longest or max_length(settings.data),
                        Path(config.run.cache_dir), value_tokens(settings))


def anchor_task(config: Config, settings: RecipeSettings, files: TaskFiles) -> PretrainTask:
    """m_B: Numeric-Arithmetic, never a key."""
    return PretrainTask("anchor", settings.anchor, anchor_seed(config), files.path(ANCHOR_TRAIN),
                        files.path(NUMERIC_ARITHMETIC), files.tokenizer_dir, max_length(settings.data),
                        Path(config.run.cache_dir), value_tokens(settings))


def value_tokens(settings: RecipeSettings) -> tuple[str, ...]:
    """The numbers a key can stand for, as tokens."""
    return tuple(str(value) for value in range(settings.data.value_max + 1))


def vanilla_augment_task(config: Config, settings: RecipeSettings, files: TaskFiles) -> PretrainTask:
    """m_A's architecture, settings and seed, trained on m_B's Numeric-Arithmetic rows instead of the keys."""
    return augment_task(config, settings, files, role="vanilla_augment", training_file=files.path(ANCHOR_TRAIN),
                        eval_set=NUMERIC_ARITHMETIC)
