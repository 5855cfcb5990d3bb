"""Augmenting models other than the default job's m_A, for the extended table: two models that each
know half of the keys, and one that reads characters instead of the anchor's words.

Each variant has its own small dataset directory next to the job's (same texts, generated from the
same config), so the base-model cache keys them like any other model.
"""
from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import data_pipeline as dp
from calm_dist.config import Config
from calm_dist.train.pretrain import model_dir, pretrain_on_split
from calm_dist.train.task_data import AUGMENT_TRAIN, EVAL_SETS, TaskData, fingerprint

CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789+-="
KEY_SUBSTITUTION_EVAL = EVAL_SETS["kv_substitution"]


def character_tokenizer() -> PreTrainedTokenizerFast:
    """One token per non-space character; offsets refer to the original text."""
    vocab = {token: index for index, token in enumerate([*dp.SPECIAL_TOKENS, *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=dp.SPECIAL_TOKENS[3]))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")])
    pad, bos, eos, unk = dp.SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, bos_token=bos, eos_token=eos,
                                   unk_token=unk, padding_side="right")


def _rows_as_examples(task_data: TaskData, split: str) -> list[dict[str, str]]:
    table, _ = dp.load_split(task_data.directory, split)
    return [{"prompt": p, "answer": a} for p, a in zip(table.column("prompt").to_pylist(),
                                                        table.column("answer").to_pylist())]


def _variant_data(config: Config, task_data: TaskData, suffix: str, build_splits, tokenizer) -> TaskData:
    directory = Path(config.run.cache_dir) / f"{fingerprint(config)}-{suffix}"
    if not (directory / dp.shards.MANIFEST_FILE).is_file():
        dp.write_dataset(directory, build_splits(), tokenizer, config.run.seed,
                         metadata={"variant_of": task_data.directory.name, "variant": suffix}, overwrite=True)
    return TaskData(directory, dp.load_manifest(directory, check_rows=False))


def character_task_data(config: Config, task_data: TaskData) -> TaskData:
    """m_A's KV-Substitution data (all keys) and its evaluation set, tokenised per character."""
    def splits():
        return {split: _rows_as_examples(task_data, split) for split in (AUGMENT_TRAIN, KEY_SUBSTITUTION_EVAL)}

    return _variant_data(config, task_data, "chars", splits, character_tokenizer())


def key_halves(config: Config) -> list[dict[str, int]]:
    """Every key of the job, shuffled with the run seed and cut into two halves."""
    data = config.data
    keys = dp.make_keys(data.num_keys, seed=config.run.seed, value_max=data.value_max,
                        key_min_len=data.key_min_len, key_max_len=data.key_max_len)
    names = sorted(keys)
    random.Random(f"key_halves:{config.run.seed}").shuffle(names)
    middle = len(names) // 2
    return [{name: keys[name] for name in part} for part in (names[:middle], names[middle:])]


def half_key_task_data(config: Config, task_data: TaskData) -> list[TaskData]:
    """One KV-Substitution training set per half of the keys, in the job's tokenizer."""
    data = config.data
    tokenizer = dp.load_tokenizer(task_data.tokenizer_dir)
    halves = []
    for index, keys in enumerate(key_halves(config)):
        def splits(keys=keys, index=index):
            train = dp.make_examples("kv_substitution", data.base_train_examples, seed=config.run.seed + 50 + index,
                                     keys=keys, value_max=data.value_max, min_operands=data.min_operands,
                                     max_operands=data.max_operands)
            return {AUGMENT_TRAIN: train}

        halves.append(_variant_data(config, task_data, f"keys{index}of2", splits, tokenizer))
    return halves


def ensure_augment_variant(config: Config, variant_data: TaskData) -> Path:
    """The directory of m_A's architecture trained on ``variant_data``'s augment split (cached)."""
    target = model_dir(config, "augment", variant_data)
    if not (target / "config.json").is_file():
        pretrain_on_split(config, "augment", AUGMENT_TRAIN, variant_data, target)
    return target
