"""data_pipeline: Arrow shards + manifest, validation, and the rank-sharded resumable reader."""

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


# ---------------------------------------------------------------- shards + manifest


def test_manifest_and_rows_round_trip(dataset_dir, tokenizer):
    manifest = dp.load_manifest(dataset_dir, expected_tokenizer_hash=dp.tokenizer_hash(tokenizer),
                                vocab_size=len(tokenizer))
    assert manifest["schema_version"] == dp.SCHEMA_VERSION
    assert manifest["seed"] == 5
    assert manifest["vocab_size"] == len(tokenizer)
    assert manifest["metadata"] == {"task": "kv_arithmetic"}
    assert manifest["splits"]["train"] == {
        "num_rows": 40, "shards": ["train-00000.arrow", "train-00001.arrow", "train-00002.arrow"]}
    assert manifest["splits"]["eval"]["num_rows"] == 7
    assert dp.tokenizer_hash(dataset_dir / manifest["tokenizer_dir"]) == manifest["tokenizer_hash"]
    table, _ = dp.load_split(dataset_dir, "train")
    assert table.num_rows == 40
    for row in table.to_pylist():
        prompt_ids = tokenizer.encode(row["prompt"], add_special_tokens=False)
        answer_ids = tokenizer.encode(row["answer"], add_special_tokens=False)
        assert row["input_ids"] == [1, *prompt_ids, *answer_ids, 2]
        assert row["labels"] == [-100] * (1 + len(prompt_ids)) + [*answer_ids, 2]
        assert row["prompt_len"] == 1 + len(prompt_ids)
        assert tokenizer.decode(row["input_ids"][1 : row["prompt_len"]]) == row["prompt"]
    from_datasets = datasets.Dataset.from_file(str(dataset_dir / "eval-00000.arrow"))
    assert from_datasets.num_rows == 7
    assert set(from_datasets.column_names) == {"input_ids", "labels", "prompt_len", "prompt",
                                               "answer"}


def test_write_is_atomic_and_refuses_to_clobber(tmp_path, tokenizer):
    examples = dp.make_examples("numeric_arithmetic", 5, seed=0, value_max=VALUE_MAX)
    out = tmp_path / "data"
    dp.write_dataset(out, {"train": examples}, tokenizer, seed=0)
    with pytest.raises(FileExistsError, match="overwrite"):
        dp.write_dataset(out, {"train": examples}, tokenizer, seed=0)
    dp.write_dataset(out, {"train": examples[:3]}, tokenizer, seed=1, overwrite=True)
    assert dp.load_manifest(out)["splits"]["train"]["num_rows"] == 3
    assert sorted(os.listdir(tmp_path)) == ["data"]
    with pytest.raises(ValueError, match="words outside"):
        dp.write_dataset(tmp_path / "bad", {"train": [{"prompt": "qqqqq =", "answer": "1"}]},
                         tokenizer, seed=0)
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_write_rejects_empty_split(tmp_path, tokenizer):
    examples = dp.make_examples("numeric_arithmetic", 5, seed=0, value_max=VALUE_MAX)
    with pytest.raises(ValueError, match="'eval'"):
        dp.write_dataset(tmp_path / "d", {"train": examples, "eval": []}, tokenizer, seed=0)
    with pytest.raises(ValueError, match="'prompt' and 'answer'"):
        dp.write_dataset(tmp_path / "d", {"train": [{"prompt": "1 ="}]}, tokenizer, seed=0)
    with pytest.raises(ValueError, match="metadata"):
        dp.write_dataset(tmp_path / "d", {"train": examples}, tokenizer, seed=0,
                         metadata={"when": object()})
    with pytest.raises(ValueError, match="split name"):
        dp.write_dataset(tmp_path / "d", {"../up": examples}, tokenizer, seed=0)
    assert not (tmp_path / "d").exists()


def copy_dataset(source, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(source, target)
    return target


def edit_manifest(directory, change):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_load_manifest_missing_dir_and_file(tmp_path, dataset_dir):
    with pytest.raises(FileNotFoundError, match="absent"):
        dp.load_manifest(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        dp.load_manifest(empty)
    copy = copy_dataset(dataset_dir, tmp_path)
    os.remove(copy / "train-00001.arrow")
    with pytest.raises(FileNotFoundError, match="train-00001.arrow"):
        dp.load_manifest(copy)


def test_load_manifest_version_hash_and_empty_split(tmp_path, dataset_dir):
    copy = copy_dataset(dataset_dir, tmp_path)
    with pytest.raises(ValueError, match="tokenizer_hash"):
        dp.load_manifest(copy, expected_tokenizer_hash="0" * 64)
    with pytest.raises(ValueError, match="tokenizer_hash"):
        dp.ShardedReader(copy, "train", 4, expected_tokenizer_hash="0" * 64)
    edit_manifest(copy, lambda m: m["splits"].update(dev={"num_rows": 0, "shards": []}))
    with pytest.raises(ValueError, match="'dev'"):
        dp.load_manifest(copy)
    edit_manifest(copy, lambda m: m.update(schema_version=2))
    with pytest.raises(ValueError, match="schema_version"):
        dp.load_manifest(copy)


@pytest.fixture(scope="module")
def good_table(tokenizer):
    examples = dp.make_examples("numeric_arithmetic", 6, seed=0, value_max=VALUE_MAX)
    return dp.tokenize_examples(examples, tokenizer)


def with_cell(table, column, row, value):
    values = table.column(column).to_pylist()
    values[row] = value(values[row]) if callable(value) else value
    index = table.column_names.index(column)
    return table.set_column(index, column, pa.array(values, type=table.schema.field(column).type))


@pytest.mark.parametrize(
    "column, row, value, message",
    [
        ("labels", 3, lambda labels: labels[:-1], "row 3: labels has"),
        ("input_ids", 2, lambda ids: [ids[0], 10_000, *ids[2:]], "row 2: token id 10000"),
        ("input_ids", 1, lambda ids: [ids[0], -5, *ids[2:]], "row 1: token id -5"),
        ("prompt_len", 4, 0, "row 4: prompt_len 0"),
        ("prompt_len", 5, lambda n: n + 10, "row 5: prompt_len"),
        ("labels", 1, lambda labels: [7, *labels[1:]], "row 1: labels must be -100"),
        ("labels", 0, lambda labels: [*labels[:-1], 3], "row 0: labels must be"),
        ("input_ids", 2, None, "row 2: input_ids is null"),
        ("labels", 4, lambda labels: [*labels[:-1], None], "row 4: labels holds a null"),
    ],
)
def test_validate_rows_names_file_and_row(good_table, tokenizer, column, row, value, message):
    dp.validate_rows(good_table, "shard.arrow", vocab_size=len(tokenizer))
    broken = with_cell(good_table, column, row, value)
    with pytest.raises(ValueError, match=f"shard.arrow: {message}"):
        dp.validate_rows(broken, "shard.arrow", vocab_size=len(tokenizer))


def test_validate_rows_missing_or_mistyped_column(good_table):
    with pytest.raises(ValueError, match="x.arrow: missing column 'labels'"):
        dp.validate_rows(good_table.drop_columns(["labels"]), "x.arrow")
    mistyped = good_table.set_column(2, "prompt_len", pa.array(["1"] * 6))
    with pytest.raises(ValueError, match="x.arrow: column 'prompt_len'"):
        dp.validate_rows(mistyped, "x.arrow")


def test_corrupt_shard_is_caught_at_open_time(tmp_path, dataset_dir, tokenizer):
    copy = copy_dataset(dataset_dir, tmp_path)
    path = copy / "train-00001.arrow"
    table = pa.ipc.open_stream(path.read_bytes()).read_all()  # not mapped: we rewrite it
    broken = with_cell(table, "labels", 5, lambda labels: labels[:-1])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, broken.schema) as writer:
        writer.write_table(broken)
    with pytest.raises(ValueError, match="train-00001.arrow: row 5"):
        dp.load_manifest(copy)
    with pytest.raises(ValueError, match="train-00001.arrow: row 5"):
        dp.ShardedReader(copy, "train", 4)
    dp.load_manifest(copy, check_rows=False)
    dp.ShardedReader(copy, "eval", 4)  # other splits stay readable
    with pytest.raises(ValueError, match="eval-00000.arrow: row .*outside the vocabulary"):
        dp.ShardedReader(copy, "eval", 4, vocab_size=10)


# ---------------------------------------------------------------- reader


def test_pad_batch_left_and_right():
    rows = [[5, 6, 7], [8]]
    ids, mask = dp.pad_batch(rows, pad_id=0, padding_side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = dp.pad_batch(rows, pad_id=9, padding_side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long and mask.dtype == torch.long
    prompts = dp.collate_prompts([[1, 4], [1, 4, 5, 6]], pad_id=0)
    assert prompts["input_ids"].tolist() == [[0, 0, 1, 4], [1, 4, 5, 6]]
    assert prompts["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="padding_side"):
        dp.pad_batch(rows, 0, "middle")


@pytest.mark.parametrize("side", ["left", "right"])
def test_reader_padding_sides(dataset_dir, side):
    reader = dp.ShardedReader(dataset_dir, "train", 8, shuffle=False, padding_side=side, pad_id=0)
    table, _ = dp.load_split(dataset_dir, "train")
    batch = next(reader)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    shape = batch["input_ids"].shape
    assert all(t.dtype == torch.long and t.shape == shape for t in batch.values())
    width = batch["input_ids"].shape[1]
    for index, row in enumerate(table.slice(0, 8).to_pylist()):
        pad = width - len(row["input_ids"])
        ids, labels, mask = (batch[k][index].tolist()
                             for k in ("input_ids", "labels", "attention_mask"))
        if side == "right":
            assert ids == row["input_ids"] + [0] * pad
            assert labels == row["labels"] + [-100] * pad
            assert mask == [1] * len(row["input_ids"]) + [0] * pad
        else:
            assert ids == [0] * pad + row["input_ids"]
            assert labels == [-100] * pad + row["labels"]
            assert mask == [0] * pad + [1] * len(row["input_ids"])
    assert width == max(len(r) for r in table.slice(0, 8).column("input_ids").to_pylist())


def test_one_epoch_visits_every_row_once(dataset_dir):
    table, _ = dp.load_split(dataset_dir, "train")
    expected = sorted(zip(map(tuple, table.column("input_ids").to_pylist()),
                          map(tuple, table.column("labels").to_pylist())))
    reader = dp.ShardedReader(dataset_dir, "train", 5, seed=3)
    assert len(reader) == reader.batches_per_epoch == 8
    seen = [row for batch in take(reader, 8) for row in unpadded_rows(batch)]
    assert sorted(seen) == expected
    assert reader.state_dict()["epoch"] == 1
    unshuffled = dp.ShardedReader(dataset_dir, "train", 40, shuffle=False)
    assert unpadded_rows(next(unshuffled)) == list(zip(
        map(tuple, table.column("input_ids").to_pylist()),
        map(tuple, table.column("labels").to_pylist())))


def test_order_depends_on_seed_and_epoch_only(dataset_dir):
    def first_rows(**kwargs):
        reader = dp.ShardedReader(dataset_dir, "train", 40, **kwargs)
        return [unpadded_rows(batch) for batch in take(reader, 2)]

    same = first_rows(seed=1)
    assert same == first_rows(seed=1)
    assert same != first_rows(seed=2)
    assert same[0] != same[1] and sorted(same[0]) == sorted(same[1])
    assert np.array_equal(dp.epoch_order(40, 1, 0), np.random.default_rng([1, 0]).permutation(40))
    assert dp.epoch_order(5, 1, 0, shuffle=False).tolist() == [0, 1, 2, 3, 4]


def test_ranks_partition_the_single_process_batches(dataset_dir):
    single = dp.ShardedReader(dataset_dir, "train", 8, seed=4)
    ranks = [dp.ShardedReader(dataset_dir, "train", 4, rank=r, world_size=2, seed=4)
             for r in range(2)]
    assert len(single) == len(ranks[0]) == 5
    seen_by_rank = [set(), set()]
    for _ in range(len(single)):
        whole = unpadded_rows(next(single))
        parts = [unpadded_rows(next(reader)) for reader in ranks]
        assert parts[0] + parts[1] == whole
        for rank, part in enumerate(parts):
            seen_by_rank[rank].update(part)
    assert not seen_by_rank[0] & seen_by_rank[1]
    assert len(seen_by_rank[0]) == len(seen_by_rank[1]) == 20
    for reader in ranks:
        assert reader.state_dict()["epoch"] == 1


def test_two_readers_with_same_arguments_agree(dataset_dir):
    args = dict(rank=1, world_size=2, seed=11)
    first = take(dp.ShardedReader(dataset_dir, "train", 3, **args), 12)
    second = take(dp.ShardedReader(dataset_dir, "train", 3, **args), 12)
    assert_same_batches(first, second)


@pytest.mark.parametrize("consumed", [0, 2, 4, 9])  # 5 batches per epoch: 4 and 9 cross one
def test_resume_gives_the_same_next_batches(dataset_dir, consumed):
    args = dict(rank=1, world_size=2, seed=6)
    reference = dp.ShardedReader(dataset_dir, "train", 4, **args)
    take(reference, consumed)
    state = json.loads(json.dumps(reference.state_dict()))
    expected = take(reference, 4)
    resumed = dp.ShardedReader(dataset_dir, "train", 4, **args)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert_same_batches(take(resumed, 4), expected)
    rank0 = dp.ShardedReader(dataset_dir, "train", 4, rank=0, world_size=2, seed=6)
    rank0.load_state_dict(state)  # any rank resumes from any rank's state
    assert rank0.state_dict()["batch_in_epoch"] == state["batch_in_epoch"]


def test_resume_with_another_world_size_keeps_the_global_order(dataset_dir):
    two = [dp.ShardedReader(dataset_dir, "train", 4, rank=r, world_size=2, seed=2)
           for r in range(2)]
    for reader in two:
        take(reader, 2)
    state = two[0].state_dict()
    four = [dp.ShardedReader(dataset_dir, "train", 2, rank=r, world_size=4, seed=2)
            for r in range(4)]
    for reader in four:
        reader.load_state_dict(state)
    expected = [row for reader in two for row in unpadded_rows(next(reader))]
    assert [row for reader in four for row in unpadded_rows(next(reader))] == expected
    odd = dp.ShardedReader(dataset_dir, "train", 3, seed=2)
    with pytest.raises(ValueError, match="multiple"):
        odd.load_state_dict(state)


def test_load_state_dict_rejects_a_different_seed_or_dataset(dataset_dir):
    state = dp.ShardedReader(dataset_dir, "train", 4, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        dp.ShardedReader(dataset_dir, "train", 4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_rows"):
        dp.ShardedReader(dataset_dir, "eval", 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        dp.ShardedReader(dataset_dir, "train", 4, seed=1).load_state_dict({"epoch": 0})


def test_keep_last_fills_the_final_batch_from_the_epoch_start(dataset_dir):
    reader = dp.ShardedReader(dataset_dir, "eval", 2, world_size=2, rank=1, drop_last=False,
                              shuffle=False)
    assert len(reader) == 2  # 7 rows, global batch 4
    table, _ = dp.load_split(dataset_dir, "eval")
    ids = [tuple(row) for row in table.column("input_ids").to_pylist()]
    batches = take(reader, 2)
    assert [row for row, _ in unpadded_rows(batches[0])] == ids[2:4]
    assert [row for row, _ in unpadded_rows(batches[1])] == [ids[6], ids[0]]
    assert reader.state_dict()["epoch"] == 1


def test_epochs_limit_and_size_errors(dataset_dir):
    reader = dp.ShardedReader(dataset_dir, "eval", 3, epochs=2)
    assert len(list(reader)) == 4
    with pytest.raises(ValueError, match="drop_last"):
        dp.ShardedReader(dataset_dir, "eval", 4, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        dp.ShardedReader(dataset_dir, "eval", 1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed"):
        dp.ShardedReader(dataset_dir, "eval", 1, seed=-1)
    with pytest.raises(ValueError, match="available: eval, train"):
        dp.ShardedReader(dataset_dir, "test", 1)
