"""Shared fixtures and helpers of the data_pipeline tests."""

from __future__ import annotations

import json
import os
import shutil

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import data_pipeline as dp

VALUE_MAX = 20
MAX_OPERANDS = 3


@pytest.fixture(scope="module")
def keys():
    return dp.make_keys(60, seed=7, value_max=VALUE_MAX)


@pytest.fixture(scope="module")
def tokenizer(keys):
    return dp.build_tokenizer(keys, value_max=VALUE_MAX, max_operands=MAX_OPERANDS)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, keys, tokenizer):
    """train: 40 distinct kv_arithmetic prompts (3 shards); eval: 7 numeric examples."""
    train = dp.make_examples("kv_arithmetic", 40, seed=1, value_max=VALUE_MAX, keys=keys,
                             distinct=True)
    evaluation = dp.make_examples("numeric_arithmetic", 7, seed=2, value_max=VALUE_MAX)
    out = tmp_path_factory.mktemp("data") / "kv"
    dp.write_dataset(out, {"train": train, "eval": evaluation}, tokenizer, seed=5, shard_rows=16,
                     metadata={"task": "kv_arithmetic"})
    return out


def unpadded_rows(batch):
    """Each row's (input_ids, labels) tuple with padding removed."""
    rows = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        keep = mask.bool()
        rows.append((tuple(ids[keep].tolist()), tuple(labels[keep].tolist())))
    return rows


def take(reader, count):
    return [next(reader) for _ in range(count)]


def assert_same_batches(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------- tasks

