"""Augmenting models other than the job's m_A, for the rows beyond the paper: two models that each know
half of the keys, and one that reads characters instead of the anchor's words. Their rows and tokenizer
are written beside the job's files in the task directory, on first use."""
from __future__ import annotations

import random

from calm_dist.config import Config

from . import tasks
from .models import augment_task
from .pretrain import PretrainTask
from .settings import RecipeSettings
from .task_data import TaskFiles, character_max_length, make_keys, write_jsonl
from .tokenizer import character_tokenizer, save_tokenizer

HALVES = 2


def key_halves(settings: RecipeSettings, seed: int) -> list[dict[str, int]]:
    """Every key of the task, shuffled with the run seed and cut into two halves."""
    keys = make_keys(settings.data, seed)
    names = sorted(keys)
    random.Random(f"key_halves:{seed}").shuffle(names)
    middle = len(names) // 2
    return [{name: keys[name] for name in part} for part in (names[:middle], names[middle:])]


def half_key_name(index: int) -> str:
    return f"keys{index}of{HALVES}"


def half_key_tasks(config: Config, settings: RecipeSettings, files: TaskFiles) -> list[PretrainTask]:
    """One m_A per half of the keys, each trained on KV-Substitution over its half only."""
    data, seed = settings.data, config.run.seed
    result = []
    for index, keys in enumerate(key_halves(settings, seed)):
        path = files.directory / f"augment_train_{half_key_name(index)}.jsonl"
        if not path.is_file():
            write_jsonl(path, tasks.make_examples(
                "kv_substitution", data.base_train_examples, seed=seed + 50 + index, keys=keys,
                value_max=data.value_max, min_operands=data.min_operands, max_operands=data.max_operands))
        result.append(augment_task(config, settings, files, role=f"augment_{half_key_name(index)}",
                                   training_file=path))
    return result


def character_task(config: Config, settings: RecipeSettings, files: TaskFiles) -> PretrainTask:
    """m_A trained on its own KV-Substitution rows, tokenised per character."""
    tokenizer_dir = files.directory / "tokenizer_characters"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        save_tokenizer(character_tokenizer(), tokenizer_dir)
    return augment_task(config, settings, files, role="augment_characters", tokenizer_dir=tokenizer_dir,
                        longest=character_max_length(settings.data))
