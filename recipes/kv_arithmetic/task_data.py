"""The recipe's datasets as ordinary files: JSONL prompt/completion rows and an HF tokenizer, written
once per setting under ``<run.cache_dir>/kv_arithmetic/data-<fingerprint>/``.

    tokenizer/                      the word-level tokenizer (AutoTokenizer loads it)
    augment_train.jsonl             m_A: KV-Substitution over every key
    anchor_train.jsonl              m_B: Numeric-Arithmetic, never a key
    composition_train.jsonl         D_C: KV-Arithmetic over the held-in keys (+ Numeric, if configured)
    eval_<set>.jsonl                the evaluation sets of the job (``EvalSets``)
    task.json                       what was generated (key counts, settings); written last

A row is ``{"prompt": "qz + abc =", "completion": " 28"}``: the framework encodes the two jointly,
puts the loss on the completion and adds EOS after it. Files are never rewritten once the directory
exists, so the framework's tokenised cache (keyed by path, size and mtime) stays valid.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from . import tasks
from .settings import TaskSettings
from .tokenizer import build_tokenizer, save_tokenizer

SCHEMA_VERSION = 1
RECIPE_DIR = "kv_arithmetic"

AUGMENT_TRAIN = "augment_train"
ANCHOR_TRAIN = "anchor_train"
COMPOSITION_TRAIN = "composition_train"
# Evaluation sets, by their name in the job (data.eval) and in results.json.
KV_SUBSTITUTION = "kv_substitution"  # held-out keys
NUMERIC_ARITHMETIC = "numeric_arithmetic"  # expressions not in m_B's training set
KV_ARITHMETIC = "kv_arithmetic"  # held-out keys
KV_ARITHMETIC_HELDIN = "kv_arithmetic_heldin"  # held-in keys, expressions not in D_C
KV_ARITHMETIC_VAL = "kv_arithmetic_val"  # validation keys (only with recipe.data.val_fraction > 0)
TABLE_SETS = (KV_SUBSTITUTION, NUMERIC_ARITHMETIC, KV_ARITHMETIC)  # the paper's columns
MANIFEST = "task.json"


def row(example: dict[str, str]) -> dict[str, str]:
    """A generated example as a prompt/completion row (the completion's leading space separates words)."""
    return {"prompt": example["prompt"], "completion": " " + example["answer"]}


def write_jsonl(path: Path, examples: list[dict[str, str]]) -> None:
    """The examples as prompt/completion rows; the file appears atomically."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w") as handle:
        for example in examples:
            handle.write(json.dumps(row(example)) + "\n")
    os.replace(temporary, path)


def read_examples(path: Path) -> list[dict[str, str]]:
    """The examples of a file written by ``write_jsonl``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"prompt": r["prompt"], "answer": r["completion"][1:]} for r in rows]


@dataclass(frozen=True)
class KeyCounts:
    heldin: int
    val: int
    heldout: int


@dataclass(frozen=True)
class TaskFiles:
    """A written task directory."""

    directory: Path

    def path(self, split: str) -> Path:
        name = split if split in (AUGMENT_TRAIN, ANCHOR_TRAIN, COMPOSITION_TRAIN) else f"eval_{split}"
        return self.directory / f"{name}.jsonl"

    @property
    def tokenizer_dir(self) -> Path:
        return self.directory / "tokenizer"

    @property
    def manifest(self) -> dict:
        return json.loads((self.directory / MANIFEST).read_text())

    @property
    def eval_sets(self) -> list[str]:
        """The job's evaluation sets, in evaluation order."""
        return list(self.manifest["eval_sets"])

    @property
    def key_counts(self) -> KeyCounts:
        return KeyCounts(**self.manifest["key_counts"])


def fingerprint(data: TaskSettings, seed: int) -> str:
    blob = json.dumps({"data": asdict(data), "seed": seed, "schema": SCHEMA_VERSION}, sort_keys=True)
    return "data-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def task_directory(cache_dir: str | os.PathLike, data: TaskSettings, seed: int) -> Path:
    return Path(cache_dir) / RECIPE_DIR / fingerprint(data, seed)


def make_keys(data: TaskSettings, seed: int) -> dict[str, int]:
    return tasks.make_keys(data.num_keys, seed=seed, value_max=data.value_max, key_min_len=data.key_min_len,
                           key_max_len=data.key_max_len)


def _operand_settings(data: TaskSettings) -> dict:
    return dict(value_max=data.value_max, min_operands=data.min_operands, max_operands=data.max_operands)


def _augment_splits(data: TaskSettings, seed: int, keys: dict, split: tasks.KeySplit) -> tuple[list, list]:
    """m_A's KV-Substitution training set (all keys) and its evaluation set (held-out keys, unseen prompts)."""
    common = _operand_settings(data)
    if data.augment_number_operand_prob == 0:
        return tasks.make_train_eval(KV_SUBSTITUTION, data.base_train_examples, data.eval_examples, seed=seed,
                                     train_keys=keys, eval_keys=split.heldout, **common)
    train = tasks.make_mixed_substitution(data.base_train_examples, seed=seed, keys=keys,
                                          number_prob=data.augment_number_operand_prob, **common)
    evaluation = tasks.make_examples(KV_SUBSTITUTION, data.eval_examples, seed=seed + 1, keys=split.heldout,
                                     distinct=True, exclude={e["prompt"] for e in train}, **common)
    return train, evaluation


def generate_splits(data: TaskSettings, seed: int) -> tuple[dict[str, list[dict[str, str]]], KeyCounts, list]:
    """Every split's examples (training splits, then the evaluation sets in order), the key counts and
    the keys in tokenizer order."""
    keys = make_keys(data, seed)
    split = tasks.split_keys(keys, seed=seed, heldin_fraction=data.heldin_fraction, val_fraction=data.val_fraction)
    common = _operand_settings(data)
    n_base, n_dc, n_eval = data.base_train_examples, data.composition_train_examples, data.eval_examples
    splits: dict[str, list] = {}
    splits[AUGMENT_TRAIN], substitution_eval = _augment_splits(data, seed, keys, split)
    splits[ANCHOR_TRAIN], numeric_eval = tasks.make_train_eval(NUMERIC_ARITHMETIC, n_base, n_eval, seed=seed + 10,
                                                               **common)
    n_numeric = int(round(n_dc * data.composition_numeric_fraction))
    splits[COMPOSITION_TRAIN], heldin_eval = tasks.make_train_eval(
        KV_ARITHMETIC, n_dc - n_numeric, n_eval, seed=seed + 20, train_keys=split.heldin,
        train_operand_weights=data.composition_operand_weights, **common)
    if n_numeric and data.composition_numeric_fresh:  # never an evaluation expression
        splits[COMPOSITION_TRAIN] += tasks.make_examples(
            NUMERIC_ARITHMETIC, n_numeric, seed=seed + 22, exclude={example["prompt"] for example in numeric_eval},
            **common)
    elif n_numeric:  # from m_B's training set: never an evaluation expression
        rng = random.Random(seed + 21)
        splits[COMPOSITION_TRAIN] += [rng.choice(splits[ANCHOR_TRAIN]) for _ in range(n_numeric)]
    splits[KV_SUBSTITUTION] = substitution_eval
    splits[NUMERIC_ARITHMETIC] = numeric_eval
    splits[KV_ARITHMETIC] = tasks.make_examples(KV_ARITHMETIC, n_eval, seed=seed + 30, keys=split.heldout,
                                                distinct=True, **common)
    splits[KV_ARITHMETIC_HELDIN] = heldin_eval
    if split.val:
        splits[KV_ARITHMETIC_VAL] = tasks.make_examples(KV_ARITHMETIC, n_eval, seed=seed + 40, keys=split.val,
                                                        distinct=True, **common)
    return splits, KeyCounts(len(split.heldin), len(split.val), len(split.heldout)), list(keys)


def prepare_task_files(cache_dir: str | os.PathLike, data: TaskSettings, seed: int) -> TaskFiles:
    """The task directory of these settings, generated when the cache does not hold it yet."""
    directory = task_directory(cache_dir, data, seed)
    files = TaskFiles(directory)
    if (directory / MANIFEST).is_file():
        return files
    splits, key_counts, keys = generate_splits(data, seed)
    staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        staged = TaskFiles(staging)
        save_tokenizer(build_tokenizer(keys, value_max=data.value_max, max_operands=data.max_operands),
                       staged.tokenizer_dir)
        for name, examples in splits.items():
            write_jsonl(staged.path(name), examples)
        eval_sets = [name for name in splits if name not in (AUGMENT_TRAIN, ANCHOR_TRAIN, COMPOSITION_TRAIN)]
        manifest = {"schema": SCHEMA_VERSION, "seed": seed, "settings": asdict(data), "eval_sets": eval_sets,
                    "key_counts": asdict(key_counts), "rows": {name: len(rows) for name, rows in splits.items()}}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files


def max_length(data: TaskSettings) -> int:
    """Tokens of the longest row of any split in the word-level tokenizer: BOS, the prompt (operands,
    operators, ``=``), the longest completion (a KV-Substitution answer), EOS."""
    expression = 2 * data.max_operands - 1
    return 1 + expression + 1 + expression + 1


def character_max_length(data: TaskSettings) -> int:
    """Tokens of the longest row in the character tokenizer (keys and numbers spelt out)."""
    low, high = tasks.number_token_range(data.value_max, data.max_operands)
    operators = data.max_operands - 1
    prompt = data.max_operands * max(data.key_max_len, len(str(data.value_max))) + operators + 1
    substitution = data.max_operands * len(str(data.value_max)) + operators
    result = max(len(str(low)), len(str(high)))
    return 1 + prompt + max(substitution, result) + 1
