"""data_pipeline: task generators, key splits and the tokenizer."""

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

from tests.data_fixtures import keys, tokenizer, dataset_dir, unpadded_rows, take, assert_same_batches, VALUE_MAX, MAX_OPERANDS  # noqa: F401

def test_keys_are_deterministic_distinct_and_well_formed():
    first = dp.make_keys(200, seed=3, value_max=VALUE_MAX)
    assert first == dp.make_keys(200, seed=3, value_max=VALUE_MAX)
    assert list(first) == list(dp.make_keys(200, seed=3, value_max=VALUE_MAX))
    assert first != dp.make_keys(200, seed=4, value_max=VALUE_MAX)
    assert len(first) == 200
    for key, value in first.items():
        assert 2 <= len(key) <= 4 and key.isalpha() and key.islower()
        assert 0 <= value <= VALUE_MAX
    lengths = dp.make_keys(50, seed=0, value_max=5, key_min_len=5, key_max_len=6)
    assert {len(key) for key in lengths} <= {5, 6}


def test_make_keys_rejects_impossible_requests():
    with pytest.raises(ValueError, match="num_keys"):
        dp.make_keys(400, seed=0, value_max=9, key_min_len=2, key_max_len=2)
    with pytest.raises(ValueError, match="key_min_len"):
        dp.make_keys(10, seed=0, value_max=9, key_min_len=3, key_max_len=2)
    with pytest.raises(ValueError, match="value_max"):
        dp.make_keys(10, seed=0, value_max=0)


def test_split_fractions_are_exact_disjoint_and_seeded():
    keys = dp.make_keys(100, seed=0, value_max=VALUE_MAX)
    split = dp.split_keys(keys, seed=1, heldin_fraction=0.2, val_fraction=0.1)
    assert (len(split.heldin), len(split.val), len(split.heldout)) == (20, 10, 70)
    assert not set(split.heldin) & set(split.val)
    assert not set(split.heldin) & set(split.heldout)
    assert not set(split.val) & set(split.heldout)
    assert {**split.heldin, **split.val, **split.heldout} == keys
    assert split == dp.split_keys(keys, seed=1, heldin_fraction=0.2, val_fraction=0.1)
    assert split.heldin != dp.split_keys(keys, seed=2, heldin_fraction=0.2).heldin
    default = dp.split_keys(keys, seed=1)
    assert (len(default.heldin), len(default.val), len(default.heldout)) == (20, 0, 80)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"heldin_fraction": 0.0}, "heldin_fraction"),
        ({"heldin_fraction": 0.8, "val_fraction": 0.3}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"heldin_fraction": 0.01}, "too few"),
    ],
)
def test_split_rejects_bad_fractions(kwargs, field):
    keys = dp.make_keys(20, seed=0, value_max=VALUE_MAX)
    with pytest.raises(ValueError, match=field):
        dp.split_keys(keys, seed=0, **kwargs)


def parse_expression(text):
    words = text.split()
    return words[0::2], words[1::2]


@pytest.mark.parametrize("task", dp.TASKS)
def test_answers_are_correct(task, keys):
    examples = dp.make_examples(task, 300, seed=0, value_max=VALUE_MAX, keys=keys)
    counts, operators = set(), set()
    for example in examples:
        assert example.keys() == {"prompt", "answer"}
        assert example["prompt"].endswith(" =")
        operands, ops = parse_expression(example["prompt"][: -len(" =")])
        counts.add(len(operands))
        operators.update(ops)
        if task == "numeric_arithmetic":
            values = [int(word) for word in operands]
            assert all(0 <= value <= VALUE_MAX for value in values)
        else:
            values = [keys[word] for word in operands]
        expected = values[0]
        for op, value in zip(ops, values[1:]):
            expected = expected + value if op == "+" else expected - value
        if task == "kv_substitution":
            assert parse_expression(example["answer"]) == ([str(v) for v in values], ops)
        else:
            assert example["answer"] == str(expected)
    assert counts == {2, 3}
    assert operators == {"+", "-"}


def test_examples_are_deterministic_per_seed(keys):
    make = lambda seed: dp.make_examples("kv_substitution", 50, seed=seed,  # noqa: E731
                                         value_max=VALUE_MAX, keys=keys)
    assert make(0) == make(0)
    assert make(0) != make(1)


def test_negative_results_fit_the_number_tokens(tokenizer):
    low, high = dp.number_token_range(VALUE_MAX, MAX_OPERANDS)
    assert (low, high) == (-40, 60)
    examples = dp.make_examples("numeric_arithmetic", 2000, seed=0, value_max=VALUE_MAX)
    answers = [int(example["answer"]) for example in examples]
    assert min(answers) < 0
    assert all(low <= answer <= high for answer in answers)
    for number in (low, -7, 0, high):
        assert len(tokenizer.encode(str(number), add_special_tokens=False)) == 1


def test_eval_set_is_distinct_and_disjoint_from_train(keys):
    excluded = {example["prompt"] for example in dp.make_examples(
        "kv_arithmetic", 100, seed=9, value_max=VALUE_MAX, keys=keys)}
    train, evaluation = dp.make_train_eval(
        "kv_arithmetic", 3000, 500, seed=0, value_max=VALUE_MAX, train_keys=keys,
        exclude=excluded,
    )
    train_prompts = {example["prompt"] for example in train}
    eval_prompts = [example["prompt"] for example in evaluation]
    assert len(train) == 3000 and len(evaluation) == 500
    assert len(set(eval_prompts)) == 500
    assert not set(eval_prompts) & train_prompts
    assert not set(eval_prompts) & excluded


def test_disjoint_key_subsets_give_disjoint_prompts(keys):
    split = dp.split_keys(keys, seed=0)
    train, evaluation = dp.make_train_eval(
        "kv_arithmetic", 200, 100, seed=0, value_max=VALUE_MAX,
        train_keys=split.heldin, eval_keys=split.heldout,
    )
    assert all(set(parse_expression(e["prompt"][:-2])[0]) <= set(split.heldin) for e in train)
    assert all(set(parse_expression(e["prompt"][:-2])[0]) <= set(split.heldout)
               for e in evaluation)


def test_distinct_sampling_raises_when_space_is_too_small():
    keys = {"ab": 1, "cd": 2}
    small = dict(seed=0, value_max=VALUE_MAX, keys=keys, min_operands=2, max_operands=2)
    assert dp.expression_space_size(2, 2, 2) == 8
    everything = dp.make_examples("kv_arithmetic", 8, distinct=True, **small)
    assert len({example["prompt"] for example in everything}) == 8
    with pytest.raises(ValueError, match="distinct"):
        dp.make_examples("kv_arithmetic", 9, distinct=True, **small)
    with pytest.raises(ValueError, match="excluded"):
        dp.make_examples("kv_arithmetic", 8, distinct=True, exclude={"ab + cd ="}, **small)
    assert len(dp.make_examples("kv_arithmetic", 20, **small)) == 20  # with replacement


def test_task_argument_errors(keys):
    with pytest.raises(ValueError, match="unknown task"):
        dp.make_examples("kv_multiplication", 1, seed=0, value_max=VALUE_MAX, keys=keys)
    with pytest.raises(ValueError, match="keys"):
        dp.make_examples("kv_arithmetic", 1, seed=0, value_max=VALUE_MAX)
    with pytest.raises(ValueError, match="min_operands"):
        dp.make_examples("numeric_arithmetic", 1, seed=0, value_max=VALUE_MAX,
                         min_operands=3, max_operands=2)
    with pytest.raises(ValueError, match="value_max"):
        dp.make_examples("kv_arithmetic", 1, seed=0, value_max=5, keys={"ab": 9})


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_vocabulary_layout(keys, tokenizer):
    low, high = dp.number_token_range(VALUE_MAX, MAX_OPERANDS)
    ids = tokenizer.convert_tokens_to_ids
    assert [ids(t) for t in ("<pad>", "<bos>", "<eos>", "<unk>", "+", "-", "=")] == list(range(7))
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert ids(str(low)) == 7 and ids(str(high)) == 7 + high - low
    assert [ids(key) for key in keys] == list(range(8 + high - low, len(tokenizer)))
    assert len(tokenizer) == 7 + (high - low + 1) + len(keys)


def test_every_key_and_number_is_one_token_and_round_trips(keys, tokenizer):
    low, high = dp.number_token_range(VALUE_MAX, MAX_OPERANDS)
    for word in [*keys, *map(str, range(low, high + 1)), "+", "-", "="]:
        ids = tokenizer.encode(word, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, word
    for task in dp.TASKS:
        for example in dp.make_examples(task, 20, seed=0, value_max=VALUE_MAX, keys=keys):
            text = f"{example['prompt']} {example['answer']}"
            ids = tokenizer.encode(text)
            assert len(ids) == len(text.split())
            assert tokenizer.decode(ids) == text


def test_tokenizer_adds_no_special_tokens(tokenizer):
    key = "+ 3 ="
    assert tokenizer(key)["input_ids"] == tokenizer.encode(key, add_special_tokens=False)
    assert tokenizer.bos_token_id not in tokenizer.encode(key)
    assert tokenizer.eos_token_id not in tokenizer.encode(key)


def test_encode_words_rejects_unknown_words(tokenizer):
    with pytest.raises(ValueError, match="zzzzzz"):
        dp.encode_words(tokenizer, "zzzzzz + 3 =")


@pytest.mark.parametrize("bad", ["Ab", "a1", "a b"])
def test_build_tokenizer_rejects_bad_keys(bad):
    with pytest.raises(ValueError, match="lowercase"):
        dp.build_tokenizer([bad], value_max=3, max_operands=2)


def test_tokenizer_save_load_and_hash(tmp_path, keys, tokenizer):
    directory = dp.save_tokenizer(tokenizer, tmp_path / "tok")
    digest = dp.tokenizer_hash(directory)
    assert len(digest) == 64 and digest == dp.tokenizer_hash(tokenizer)
    text = " ".join(list(keys)[:3]) + " + -7 ="
    for loaded in (AutoTokenizer.from_pretrained(directory),
                   PreTrainedTokenizerFast.from_pretrained(directory),
                   dp.load_tokenizer(directory)):
        assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
        assert (loaded.pad_token, loaded.bos_token, loaded.eos_token, loaded.unk_token) == \
            ("<pad>", "<bos>", "<eos>", "<unk>")
        assert dp.tokenizer_hash(loaded) == digest
    rebuilt = dp.build_tokenizer(dp.make_keys(60, seed=7, value_max=VALUE_MAX),
                                 value_max=VALUE_MAX, max_operands=MAX_OPERANDS)
    assert dp.tokenizer_hash(rebuilt) == digest
    other = dp.build_tokenizer(dp.make_keys(60, seed=8, value_max=VALUE_MAX),
                               value_max=VALUE_MAX, max_operands=MAX_OPERANDS)
    assert dp.tokenizer_hash(other) != digest
    dp.save_tokenizer(other, directory)  # replaces the old one
    assert dp.tokenizer_hash(directory) == dp.tokenizer_hash(other)
    assert sorted(os.listdir(tmp_path)) == ["tok"]


def test_load_tokenizer_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dp.load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dp.tokenizer_hash(tmp_path / "nowhere")


def test_mixed_substitution_reads_numbers_as_their_own_values(keys):
    examples = dp.make_mixed_substitution(400, seed=3, value_max=VALUE_MAX, keys=keys, number_prob=0.5)
    numbers = keys_seen = 0
    for example in examples:
        words, answer = example["prompt"].split()[:-1], example["answer"].split()
        assert len(words) == len(answer)
        for word, value in zip(words, answer):
            if word in "+-":
                assert value == word
            elif word.isdigit():
                numbers += 1
                assert value == word
            else:
                keys_seen += 1
                assert int(value) == keys[word]
    assert numbers > 200 and keys_seen > 200
    assert dp.make_mixed_substitution(5, seed=3, value_max=VALUE_MAX, keys=keys, number_prob=0.0)[0]["prompt"][0].isalpha()
    with pytest.raises(ValueError, match="number_prob"):
        dp.make_mixed_substitution(5, seed=3, value_max=VALUE_MAX, keys=keys, number_prob=1.5)
