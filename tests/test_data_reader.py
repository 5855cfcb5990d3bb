"""The rank-sharded, resumable reader over a tokenised dataset, and evaluation batches."""
import json

import datasets
import numpy as np
import pytest
import torch

import data_pipeline as dp


def _rows(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        length = int(rng.integers(3, 9))
        ids = rng.integers(5, 50, size=length).tolist()
        prompt = int(rng.integers(1, length))
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


@pytest.fixture(scope="module")
def train_rows():
    return _rows(40, seed=1)


@pytest.fixture(scope="module")
def eval_rows():
    return _rows(7, seed=2)


def _save(rows, directory):
    datasets.Dataset.from_list(rows).save_to_disk(str(directory))
    return directory


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory, train_rows):
    return _save(train_rows, tmp_path_factory.mktemp("reader") / "train")


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory, eval_rows):
    return _save(eval_rows, tmp_path_factory.mktemp("reader") / "eval")


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
def test_reader_padding_sides(train_dir, train_rows, side):
    reader = dp.ShardedReader(train_dir, 8, shuffle=False, padding_side=side, pad_id=0)
    batch = next(reader)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    shape = batch["input_ids"].shape
    assert all(t.dtype == torch.long and t.shape == shape for t in batch.values())
    width = batch["input_ids"].shape[1]
    for index, row in enumerate(train_rows[:8]):
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
    assert width == max(len(r["input_ids"]) for r in train_rows[:8])


def test_one_epoch_visits_every_row_once(train_dir, train_rows):
    expected = sorted((tuple(r["input_ids"]), tuple(r["labels"])) for r in train_rows)
    reader = dp.ShardedReader(train_dir, 5, seed=3)
    assert len(reader) == reader.batches_per_epoch == 8
    seen = [row for batch in take(reader, 8) for row in unpadded_rows(batch)]
    assert sorted(seen) == expected
    assert reader.state_dict()["epoch"] == 1
    unshuffled = dp.ShardedReader(train_dir, 40, shuffle=False)
    assert unpadded_rows(next(unshuffled)) == [(tuple(r["input_ids"]), tuple(r["labels"])) for r in train_rows]


def test_order_depends_on_seed_and_epoch_only(train_dir, eval_dir):
    def first_rows(**kwargs):
        reader = dp.ShardedReader(train_dir, 40, **kwargs)
        return [unpadded_rows(batch) for batch in take(reader, 2)]

    same = first_rows(seed=1)
    assert same == first_rows(seed=1)
    assert same != first_rows(seed=2)
    assert same[0] != same[1] and sorted(same[0]) == sorted(same[1])
    assert np.array_equal(dp.epoch_order(40, 1, 0), np.random.default_rng([1, 0]).permutation(40))
    assert dp.epoch_order(5, 1, 0, shuffle=False).tolist() == [0, 1, 2, 3, 4]


def test_ranks_partition_the_single_process_batches(train_dir, eval_dir):
    single = dp.ShardedReader(train_dir, 8, seed=4)
    ranks = [dp.ShardedReader(train_dir, 4, rank=r, world_size=2, seed=4)
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


def test_two_readers_with_same_arguments_agree(train_dir, eval_dir):
    args = dict(rank=1, world_size=2, seed=11)
    first = take(dp.ShardedReader(train_dir, 3, **args), 12)
    second = take(dp.ShardedReader(train_dir, 3, **args), 12)
    assert_same_batches(first, second)


@pytest.mark.parametrize("consumed", [0, 2, 4, 9])  # 5 batches per epoch: 4 and 9 cross one
def test_resume_gives_the_same_next_batches(train_dir, consumed):
    args = dict(rank=1, world_size=2, seed=6)
    reference = dp.ShardedReader(train_dir, 4, **args)
    take(reference, consumed)
    state = json.loads(json.dumps(reference.state_dict()))
    expected = take(reference, 4)
    resumed = dp.ShardedReader(train_dir, 4, **args)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert_same_batches(take(resumed, 4), expected)
    rank0 = dp.ShardedReader(train_dir, 4, rank=0, world_size=2, seed=6)
    rank0.load_state_dict(state)  # any rank resumes from any rank's state
    assert rank0.state_dict()["batch_in_epoch"] == state["batch_in_epoch"]


def test_resume_with_another_world_size_keeps_the_global_order(train_dir, eval_dir):
    two = [dp.ShardedReader(train_dir, 4, rank=r, world_size=2, seed=2)
           for r in range(2)]
    for reader in two:
        take(reader, 2)
    state = two[0].state_dict()
    four = [dp.ShardedReader(train_dir, 2, rank=r, world_size=4, seed=2)
            for r in range(4)]
    for reader in four:
        reader.load_state_dict(state)
    expected = [row for reader in two for row in unpadded_rows(next(reader))]
    assert [row for reader in four for row in unpadded_rows(next(reader))] == expected
    odd = dp.ShardedReader(train_dir, 3, seed=2)
    with pytest.raises(ValueError, match="multiple"):
        odd.load_state_dict(state)


def test_load_state_dict_rejects_a_different_seed_or_dataset(train_dir, eval_dir):
    state = dp.ShardedReader(train_dir, 4, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        dp.ShardedReader(train_dir, 4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_rows"):
        dp.ShardedReader(eval_dir, 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        dp.ShardedReader(train_dir, 4, seed=1).load_state_dict({"epoch": 0})


def test_keep_last_fills_the_final_batch_from_the_epoch_start(eval_dir, eval_rows):
    reader = dp.ShardedReader(eval_dir, 2, world_size=2, rank=1, drop_last=False,
                              shuffle=False)
    assert len(reader) == 2  # 7 rows, global batch 4
    ids = [tuple(row["input_ids"]) for row in eval_rows]
    batches = take(reader, 2)
    assert [row for row, _ in unpadded_rows(batches[0])] == ids[2:4]
    assert [row for row, _ in unpadded_rows(batches[1])] == [ids[6], ids[0]]
    assert reader.state_dict()["epoch"] == 1


def test_epochs_limit_and_size_errors(train_dir, eval_dir):
    reader = dp.ShardedReader(eval_dir, 3, epochs=2)
    assert len(list(reader)) == 4
    with pytest.raises(ValueError, match=r"7 rows, fewer than batch_size \* world_size = 8"):
        dp.ShardedReader(eval_dir, 4, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        dp.ShardedReader(eval_dir, 1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed"):
        dp.ShardedReader(eval_dir, 1, seed=-1)
    with pytest.raises(FileNotFoundError):
        dp.ShardedReader(eval_dir.parent / "missing", 1)



def test_eval_batches_cover_every_row_once_with_equal_counts_per_rank(eval_dir, eval_rows):
    ranks = [dp.EvalBatches(eval_dir, 2, rank=r, world_size=3) for r in range(3)]
    assert {len(batches) for batches in ranks} == {2}  # 7 rows, global batch 6: every rank runs 2 forwards
    seen = []
    for index in range(2):
        for batches in ranks:
            batch = batches.batch(index)
            weights = batch["row_weight"].tolist()
            seen += [row for row, weight in zip(unpadded_rows(batch), weights) if weight]
            if not any(weights):  # a padding row: nothing of it is scored
                assert (batch["labels"] == -100).all()
    assert seen == [(tuple(r["input_ids"]), tuple(r["labels"])) for r in eval_rows]


def test_schedule_evaluates_at_zero_every_n_and_the_end_and_resumes_without_repeating():
    units = list(dp.run_units(0, 5, 2, {"a": 2, "b": 1}))
    kinds = [(u.kind, u.step, u.eval_set, u.batch) for u in units]
    evaluation = lambda step: [("eval", step, "a", 0), ("eval", step, "a", 1), ("eval", step, "b", 0)]  # noqa: E731
    assert kinds == [*evaluation(0), ("train", 1, "", 0), ("train", 2, "", 0), *evaluation(2), ("train", 3, "", 0),
                     ("train", 4, "", 0), *evaluation(4), ("train", 5, "", 0), *evaluation(5)]
    assert [u.ends_eval for u in units[:3]] == [False, True, True]
    resumed = [(u.kind, u.step) for u in dp.run_units(2, 5, 2, {"a": 1})]
    assert resumed == [("train", 3), ("train", 4), ("eval", 4), ("train", 5), ("eval", 5)]
    assert [(u.kind, u.step) for u in dp.run_units(5, 5, 2, {"a": 1})] == [("eval", 5)]  # a finished run
    ends = [dp.step_ends_after(u, f) for u, f in zip(units, units[1:] + [None])]
    assert [u.step for u, end in zip(units, ends) if end] == [0, 1, 2, 3, 4, 5]
