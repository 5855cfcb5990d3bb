"""Sharded composition-only checkpoints without Ray: store semantics, size, kills mid-write, identity checks."""
import copy
import dataclasses
import json
import os

import pytest
import torch

from calm_dist.checkpoint import CheckpointStore, check_resumable, checkpoint_name, consolidated_composition, find_resume_point
from launcher.runtime import job_identity, runtime_inputs
from tests.dist_helpers import spawn
from tests.dist_workers import composition_run, killed_while_checkpointing
from tests.user_project import prepared_job

pytestmark = pytest.mark.timeout(300)


def _publish_fake(store: CheckpointStore, step: int, keep: int, payload: bytes = b"x") -> str:
    store.clear_partial(step)
    staging = store.staging_dir(step)
    (staging / "ds").mkdir(parents=True, exist_ok=True)
    (staging / "ds" / "shard.pt").write_bytes(payload)
    store.upload(staging)
    return store.publish(step, {"step": step}, keep)


@pytest.mark.parametrize("uri", [False, True], ids=["path", "pyarrow-uri"])
def test_store_publishes_atomically_keeps_the_newest_and_ignores_partials(tmp_path, uri):
    root = f"file://{tmp_path}/ckpt" if uri else str(tmp_path / "ckpt")
    store = CheckpointStore(root)
    assert store.latest() is None
    for step in (2, 4, 6):
        _publish_fake(store, step, keep=2, payload=str(step).encode())
    assert store.complete() == [checkpoint_name(4), checkpoint_name(6)]
    assert store.latest() == checkpoint_name(6)
    store.clear_partial(8)  # a save that never finished
    assert store.latest() == checkpoint_name(6) and checkpoint_name(8) not in store.complete()
    assert (store.fetch(checkpoint_name(6), "ds") / "shard.pt").read_bytes() == b"6"
    _publish_fake(store, 10, keep=2)
    assert not any(name.startswith(".partial-") for name in os.listdir(tmp_path / "ckpt"))  # stale partial removed


@pytest.fixture(scope="module")
def prepared(project, tmp_path_factory):
    return prepared_job(project, tmp_path_factory.mktemp("checkpoint"), "train.max_steps=6", "checkpoint.every_steps=2",
                        "checkpoint.keep=3")


def _inputs(job, root: str):
    return runtime_inputs(job, root, job_identity(job))


def test_checkpoint_holds_only_composition_weights_and_adam_state(prepared, tmp_path):
    root = str(tmp_path / "ckpt")
    results = spawn(composition_run, 2, (_inputs(prepared, root),), tmp_path / "out")
    params = sum(t.numel() for t in results[0]["bridges"].values())
    store = CheckpointStore(root)
    name = store.latest()
    assert name == checkpoint_name(6) and store.complete() == [checkpoint_name(s) for s in (2, 4, 6)]
    size = sum(f.stat().st_size for f in (tmp_path / "ckpt" / name).rglob("*") if f.is_file())
    ratio = size / (3 * params * 4)  # fp32 weights + Adam's two moments
    # DeepSpeed's few KB of headers are 12% of these tiny bridges; the anchor's frozen weights would add 1.7x.
    assert 1.0 <= ratio <= 1.25, f"checkpoint bytes / (3 x {params} x 4) = {ratio:.3f}"
    consolidated = consolidated_composition(store, name)
    assert consolidated.keys() == results[0]["bridges"].keys()
    for key, value in results[0]["bridges"].items():
        torch.testing.assert_close(consolidated[key], value.float(), rtol=0, atol=0)


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(prepared, tmp_path):
    root = str(tmp_path / "ckpt")
    with pytest.raises(Exception):  # the anchor rank SIGKILLs itself after writing step 4's shard
        spawn(killed_while_checkpointing, 2, (_inputs(prepared, root), 4), tmp_path / "out")
    store = CheckpointStore(root)
    assert store.latest() == checkpoint_name(2)
    assert store.complete() == [checkpoint_name(2)]
    assert (tmp_path / "ckpt" / f".partial-{checkpoint_name(4)}").is_dir()  # the half-written one, never loaded
    weights = consolidated_composition(store, store.latest())
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    point = find_resume_point(store, job_identity(prepared), 1)
    assert point.step == 2 and not point.universal
    resumed = spawn(composition_run, 2, (dataclasses.replace(_inputs(prepared, root), resume=point),),
                    tmp_path / "resumed")
    assert len(resumed[0]["losses"]) == 4
    assert store.latest() == checkpoint_name(6)
    assert not (tmp_path / "ckpt" / f".partial-{checkpoint_name(4)}").exists()


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
