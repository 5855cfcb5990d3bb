"""The KV-arithmetic datasets of the default job, generated once and cached by fingerprint."""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import data_pipeline as dp
from calm_dist.config import Config, to_dict

# Training splits of each model, and the evaluation sets of results.json.
AUGMENT_TRAIN = "augment_train"  # KV-Substitution over all keys: m_A learns every key's value
ANCHOR_TRAIN = "anchor_train"  # Numeric-Arithmetic: m_B learns arithmetic, never a key
COMPOSITION_TRAIN = "composition_train"  # D_C: KV-Arithmetic over the held-in keys only
EVAL_SETS = {
    "kv_substitution": "eval_kv_substitution",  # held-out keys
    "numeric_arithmetic": "eval_numeric_arithmetic",  # expressions not in m_B's training set
    "kv_arithmetic": "eval_kv_arithmetic",  # held-out keys
}
EVAL_HELDIN = "eval_kv_arithmetic_heldin"  # held-in keys, expressions not in D_C
EVAL_VAL = "eval_kv_arithmetic_val"  # validation keys (only when data.val_fraction > 0)


@dataclass(frozen=True)
class TaskData:
    directory: Path
    manifest: dict

    @property
    def tokenizer_dir(self) -> Path:
        return self.directory / self.manifest["tokenizer_dir"]

    @property
    def special_ids(self) -> dict:
        ids = self.manifest["special_token_ids"]
        return dict(pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def split_fingerprint(self, split: str) -> str:
        """Identity of one split's token content (and tokenizer): what a base model was trained on."""
        digest = hashlib.sha256(self.manifest["tokenizer_hash"].encode())
        for shard in self.manifest["splits"][split]["shards"]:
            digest.update((self.directory / shard).read_bytes())
        return digest.hexdigest()[:16]


def fingerprint(config: Config) -> str:
    blob = json.dumps({"data": to_dict(config)["data"], "seed": config.run.seed, "schema": dp.SCHEMA_VERSION},
                      sort_keys=True)
    return "data-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def _augment_splits(data, seed: int, keys: dict, split) -> tuple[list, list]:
    """m_A's KV-Substitution training set (all keys) and its evaluation set (held-out keys, unseen prompts)."""
    common = dict(value_max=data.value_max, min_operands=data.min_operands, max_operands=data.max_operands)
    if data.augment_number_operand_prob == 0:
        return dp.make_train_eval("kv_substitution", data.base_train_examples, data.eval_examples, seed=seed,
                                  train_keys=keys, eval_keys=split.heldout, **common)
    train = dp.make_mixed_substitution(data.base_train_examples, seed=seed, keys=keys,
                                       number_prob=data.augment_number_operand_prob, **common)
    evaluation = dp.make_examples("kv_substitution", data.eval_examples, seed=seed + 1, keys=split.heldout,
                                  distinct=True, exclude={e["prompt"] for e in train}, **common)
    return train, evaluation


def _splits(config: Config) -> tuple[dict, dict]:
    data, seed = config.data, config.run.seed
    keys = dp.make_keys(data.num_keys, seed=seed, value_max=data.value_max,
                        key_min_len=data.key_min_len, key_max_len=data.key_max_len)
    split = dp.split_keys(keys, seed=seed, heldin_fraction=data.heldin_fraction, val_fraction=data.val_fraction)
    common = dict(value_max=data.value_max, min_operands=data.min_operands, max_operands=data.max_operands)
    n_base, n_dc, n_eval = data.base_train_examples, data.composition_train_examples, data.eval_examples
    splits = {}
    splits[AUGMENT_TRAIN], splits[EVAL_SETS["kv_substitution"]] = _augment_splits(data, seed, keys, split)
    splits[ANCHOR_TRAIN], splits[EVAL_SETS["numeric_arithmetic"]] = dp.make_train_eval(
        "numeric_arithmetic", n_base, n_eval, seed=seed + 10, **common)
    n_numeric = int(round(n_dc * data.composition_numeric_fraction))
    splits[COMPOSITION_TRAIN], splits[EVAL_HELDIN] = dp.make_train_eval(
        "kv_arithmetic", n_dc - n_numeric, n_eval, seed=seed + 20, train_keys=split.heldin, **common)
    if n_numeric:  # plain Numeric examples from m_B's training set: never an evaluation expression
        rng = random.Random(seed + 21)
        splits[COMPOSITION_TRAIN] += [rng.choice(splits[ANCHOR_TRAIN]) for _ in range(n_numeric)]
    splits[EVAL_SETS["kv_arithmetic"]] = dp.make_examples(
        "kv_arithmetic", n_eval, seed=seed + 30, keys=split.heldout, distinct=True, **common)
    if split.val:
        splits[EVAL_VAL] = dp.make_examples(
            "kv_arithmetic", n_eval, seed=seed + 40, keys=split.val, distinct=True, **common)
    key_counts = {"heldin": len(split.heldin), "val": len(split.val), "heldout": len(split.heldout)}
    return splits, {"keys": keys, "key_counts": key_counts, "heldin_keys": sorted(split.heldin)}


def prepare_task_data(config: Config) -> TaskData:
    """Generate, tokenise and write every split (skipped when the cache already holds them)."""
    directory = Path(config.run.cache_dir) / fingerprint(config)
    if not (directory / "manifest.json").is_file():
        splits, facts = _splits(config)
        data = config.data
        tokenizer = dp.build_tokenizer(facts["keys"], value_max=data.value_max, max_operands=data.max_operands)
        metadata = {"data_config": to_dict(config)["data"], "key_counts": facts["key_counts"]}
        dp.write_dataset(directory, splits, tokenizer, config.run.seed, metadata=metadata, overwrite=True)
    return TaskData(directory, dp.load_manifest(directory, check_rows=False))


def eval_rows(task_data: TaskData, split: str) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, answers) token ids of an evaluation split; answers exclude the EOS."""
    table, _ = dp.load_split(task_data.directory, split)
    ids = table.column("input_ids").to_pylist()
    prompt_lens = table.column("prompt_len").to_pylist()
    prompts = [row[:n] for row, n in zip(ids, prompt_lens)]
    answers = [row[n:-1] for row, n in zip(ids, prompt_lens)]
    return prompts, answers
