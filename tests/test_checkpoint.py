"""Sharded composition-only checkpoints without Ray: store semantics, size, kills mid-write, identity checks."""
import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from calm_dist.checkpoint import CheckpointStore, check_resumable, checkpoint_name, consolidated_composition, find_resume_point
from launcher.runtime import job_identity, runtime_inputs
from tests.checkpoint_helpers import FAKE_IDENTITY, check_store_semantics, publish_fake
from tests.dist_helpers import spawn
from tests.user_project import prepared_job
from tests.dist_workers import composition_run, killed_while_checkpointing

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("uri", [False, True], ids=["path", "pyarrow-uri"])
def test_store_publishes_atomically_keeps_the_newest_and_removes_crashed_saves(tmp_path, uri):
    check_store_semantics(CheckpointStore(f"file://{tmp_path}/ckpt" if uri else str(tmp_path / "ckpt")))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["latest", checkpoint_name(6), checkpoint_name(10)]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, file, says", [
    (_truncate, "ds/shard.pt", "(ds/shard.pt has 1145 bytes, 1152 were written)"),
    (_flip_a_bit, "rng/rank_00000.pt", "(rng/rank_00000.pt differs from what was written (sha256 mismatch))"),
    (_flip_a_bit, "meta.json", "(meta.json is damaged: "),
    (Path.unlink, "ds/shard.pt", "(ds/shard.pt is missing)"),
], ids=["truncated", "bit-flipped", "meta-bit-flipped", "missing"])
def test_a_damaged_latest_checkpoint_is_passed_over_for_the_previous_one(tmp_path, damage, file, says):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    for step in (2, 4, 6):
        publish_fake(store, step, keep=3)
    damage(tmp_path / "ckpt" / checkpoint_name(6) / file)
    told = []
    point = find_resume_point(CheckpointStore(store.uri), FAKE_IDENTITY, 1, on_fallback=told.append)
    assert point.name == checkpoint_name(4) and point.step == 4 and point.reader == {"position": 4}
    assert len(told) == 2 and checkpoint_name(6) in told[0] and says in told[0], told
    assert told[1] == f"resuming from {checkpoint_name(4)}, the newest intact checkpoint, instead of {checkpoint_name(6)}"
    # The next save of step 6 replaces the damaged one.
    publish_fake(store, 6, keep=3)
    assert find_resume_point(CheckpointStore(store.uri), FAKE_IDENTITY, 1, on_fallback=told.append).step == 6
    assert len(told) == 2


def test_with_every_checkpoint_damaged_the_run_starts_over_and_says_so_on_the_log(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    for step in (2, 4):
        publish_fake(store, step, keep=3)
        _flip_a_bit(tmp_path / "ckpt" / checkpoint_name(step) / "ds" / "shard.pt")
    with caplog.at_level("WARNING", logger="calm_dist.checkpoint"):
        assert find_resume_point(store, FAKE_IDENTITY, 1) is None
    assert caplog.messages[-1] == (f"no intact checkpoint in {store.uri} (damaged: {checkpoint_name(4)}, "
                                   f"{checkpoint_name(2)}): starting from step 0")


@pytest.fixture(scope="module")
def prepared(project, tmp_path_factory):
    return prepared_job(project, tmp_path_factory.mktemp("checkpoint"), "train.max_steps=6", "checkpoint.every_steps=2",
                        "checkpoint.keep=3")


def _inputs(job, root: str):
    return runtime_inputs(job, root, job_identity(job))


@pytest.fixture(scope="module")
def finished_run(prepared, tmp_path_factory):
    """A 6-step run with checkpoints at steps 2, 4 and 6: (store root, anchor rank 0's result)."""
    work = tmp_path_factory.mktemp("finished")
    root = str(work / "ckpt")
    return root, spawn(composition_run, 2, (_inputs(prepared, root),), work / "out")[0]


def test_checkpoint_holds_only_composition_weights_and_adam_state(finished_run):
    root, result = finished_run
    params = sum(t.numel() for t in result["bridges"].values())
    store = CheckpointStore(root)
    name = store.latest()
    assert name == checkpoint_name(6) and store.complete() == [checkpoint_name(s) for s in (2, 4, 6)]
    files = [f for f in (Path(root) / name).rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    ratio = size / (3 * params * 4)  # fp32 weights + Adam's two moments
    # DeepSpeed's few KB of headers are 12% of these tiny bridges; the anchor's frozen weights would add 1.7x.
    assert 1.0 <= ratio <= 1.25, f"checkpoint bytes / (3 x {params} x 4) = {ratio:.3f}"
    recorded = store.meta(name)["files"]  # every file but meta.json itself, with its size and checksum
    assert sorted(recorded) == sorted(f.relative_to(Path(root) / name).as_posix() for f in files if f.name != "meta.json")
    assert all(store.damage(n) is None for n in store.complete())
    consolidated = consolidated_composition(store, name)
    assert consolidated.keys() == result["bridges"].keys()
    for key, value in result["bridges"].items():
        torch.testing.assert_close(consolidated[key], value.float(), rtol=0, atol=0)


def test_a_damaged_latest_checkpoint_makes_the_job_retrain_from_the_previous_one(prepared, finished_run, tmp_path):
    root = str(tmp_path / "ckpt")
    shutil.copytree(finished_run[0], root)
    store = CheckpointStore(root)
    trained = consolidated_composition(store, checkpoint_name(6))
    optimizer_shard = next((Path(root) / checkpoint_name(6) / "ds").rglob("*optim_states.pt"))
    _flip_a_bit(optimizer_shard)
    told = []
    point = find_resume_point(store, job_identity(prepared), 1, on_fallback=told.append)
    assert point.step == 4 and optimizer_shard.name in told[0] and "sha256 mismatch" in told[0]
    resumed = spawn(composition_run, 2, (dataclasses.replace(_inputs(prepared, root), resume=point),),
                    tmp_path / "resumed")
    assert len(resumed[0]["losses"]) == 2
    assert store.latest() == checkpoint_name(6) and store.damage(checkpoint_name(6)) is None
    retrained = consolidated_composition(CheckpointStore(root), checkpoint_name(6))
    for key, value in trained.items():  # the same two steps again, from the same state
        torch.testing.assert_close(retrained[key], value, rtol=0, atol=0)


def test_kill_during_a_checkpoint_upload_leaves_the_previous_one_loadable(prepared, tmp_path):
    root = str(tmp_path / "ckpt")
    with pytest.raises(Exception):  # the anchor rank SIGKILLs itself halfway through uploading step 4's files
        spawn(killed_while_checkpointing, 2, (_inputs(prepared, root), 4), tmp_path / "out")
    store = CheckpointStore(root)
    assert store.latest() == checkpoint_name(2)
    assert store.complete() == [checkpoint_name(2)]
    half_written = Path(root) / checkpoint_name(4)
    assert any(half_written.rglob("*.pt")) and not (half_written / "meta.json").exists()  # never loaded
    weights = consolidated_composition(store, store.latest())
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    point = find_resume_point(store, job_identity(prepared), 1)
    assert point.step == 2 and not point.universal
    resumed = spawn(composition_run, 2, (dataclasses.replace(_inputs(prepared, root), resume=point),),
                    tmp_path / "resumed")
    assert len(resumed[0]["losses"]) == 4
    assert store.latest() == checkpoint_name(6)
    assert all(store.damage(name) is None for name in store.complete())  # step 4 written again, whole


def test_resume_against_changed_base_weights_is_refused(prepared, tmp_path):
    identity = job_identity(prepared)
    meta = json.loads(json.dumps({"step": 4, **identity}))
    check_resumable(meta, identity)
    meta["base_models"]["anchor"]["sha256"] = "0" * 64
    with pytest.raises(ValueError, match=r"anchor model .*sha256 000000000000.*Restore those weights"):
        check_resumable(meta, identity)
    other = copy.deepcopy(identity)
    other["config"]["train"]["batch_size"] = 16
    with pytest.raises(ValueError, match="train.batch_size=8"):
        check_resumable({"step": 4, **identity}, other)
    rewired = copy.deepcopy(identity)
    rewired["composition"]["connections"][0][0] = [0, 0]
    with pytest.raises(ValueError, match=r"the composition \(connections"):
        check_resumable({"step": 4, **identity}, rewired)
    other_data = {**identity, "data": "data-other"}
    with pytest.raises(ValueError, match=r"the data \(data"):
        check_resumable({"step": 4, **identity}, other_data)
