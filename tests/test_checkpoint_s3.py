"""Checkpoints in an object store, for real: an S3-compatible server (moto) on 127.0.0.1, started and stopped
here, and the same checkpoint code the local-directory tests run, with real ranks writing to it.

The job is a user's project (tests/user_project.py) prepared like every runtime test's.
"""
import dataclasses

import pytest
import torch

from calm_dist.checkpoint import CheckpointStore, checkpoint_name, consolidated_composition, find_resume_point
from tests.checkpoint_helpers import FAKE_IDENTITY, check_store_semantics, publish_fake
from tests.dist_helpers import spawn
from tests.dist_workers import composition_run, killed_while_checkpointing
from tests.s3_server import s3_server
from tests.user_project import prepared_job
from launcher.runtime import job_identity, runtime_inputs

pytestmark = pytest.mark.timeout(900)
ANCHOR_RANKS = 2


@pytest.fixture(scope="module")
def s3():
    with s3_server() as s3_uri:
        yield s3_uri


def test_store_semantics_on_s3(s3):
    store = CheckpointStore(s3("semantics"))
    check_store_semantics(store)
    assert store.fs.type_name == "s3"


def test_a_changed_object_in_the_latest_checkpoint_on_s3_is_passed_over(s3):
    store = CheckpointStore(s3("damaged"))
    for step in (2, 4):
        publish_fake(store, step, keep=2)
    shard = store.path(checkpoint_name(4), "ds", "shard.pt")
    data = bytearray(store._read_bytes(shard))
    data[3] ^= 0x01
    with store.fs.open_output_stream(shard) as out:  # same size, one bit changed
        out.write(bytes(data))
    told = []
    point = find_resume_point(CheckpointStore(store.uri), FAKE_IDENTITY, 1, on_fallback=told.append)
    assert point.name == checkpoint_name(2) and "ds/shard.pt differs from what was written" in told[0]


@pytest.fixture(scope="module")
def prepared(project, tmp_path_factory):
    return prepared_job(project, tmp_path_factory.mktemp("s3job"), "train.max_steps=6", f"parallel.anchor_ranks={ANCHOR_RANKS}",
                        "checkpoint.every_steps=2", "checkpoint.keep=3")


def _inputs(job, checkpoints: str, resume=None):
    return dataclasses.replace(runtime_inputs(job, checkpoints, job_identity(job)), resume=resume)


def _identity(job) -> dict:
    return job_identity(job)


def test_a_job_on_s3_survives_sigkill_during_upload_and_resumes_exactly(s3, prepared, tmp_path):
    world = ANCHOR_RANKS + 1
    uri = s3("job")
    with pytest.raises(Exception):  # anchor rank 1 dies halfway through uploading step 4's files
        spawn(killed_while_checkpointing, world, (_inputs(prepared, uri), 4, 1), tmp_path / "killed")
    store = CheckpointStore(uri)
    assert store.latest() == checkpoint_name(2) and store.complete() == [checkpoint_name(2)]
    assert store.has(checkpoint_name(4), "ds") and not store.has(checkpoint_name(4), "meta.json")  # never loaded

    point = find_resume_point(CheckpointStore(uri), _identity(prepared), ANCHOR_RANKS)
    assert (point.step, point.saved_ranks, point.universal) == (2, ANCHOR_RANKS, False)
    resumed = spawn(composition_run, world, (_inputs(prepared, uri, point),), tmp_path / "resumed")
    assert store.latest() == checkpoint_name(6)
    assert store.complete() == [checkpoint_name(step) for step in (2, 4, 6)]
    assert all(store.damage(name) is None for name in store.complete())

    # The same run on a local directory, never interrupted: the same losses and the same weights.
    local = str(tmp_path / "local")
    reference = spawn(composition_run, world, (_inputs(prepared, local),), tmp_path / "reference")
    torch.testing.assert_close(resumed[0]["losses"], reference[0]["losses"][2:], rtol=0, atol=1e-6)
    on_s3 = consolidated_composition(store, checkpoint_name(6))
    on_disk = consolidated_composition(CheckpointStore(local), checkpoint_name(6))
    for key, value in on_disk.items():
        torch.testing.assert_close(on_s3[key], value, rtol=0, atol=0)
