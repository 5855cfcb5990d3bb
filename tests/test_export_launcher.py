"""python -m launcher.export: a sharded checkpoint to an export that CALMForCausalLM.from_pretrained loads."""
import pytest
import torch
import transformers

from calm_dist import CALMForCausalLM
from calm_dist.checkpoint import CheckpointStore, consolidated_composition
from calm_dist.identity import weights_checksum
from calm_dist.model.hf import BaseModelRef
from launcher.export import composition_from_meta, main as export_main
from launcher.runtime import job_identity, runtime_inputs
from tests.dist_helpers import spawn
from tests.dist_workers import composition_run
from tests.user_project import prepared_job

pytestmark = pytest.mark.timeout(300)


def _meta(**changes) -> dict:
    meta = {
        "step": 4,
        "base_models": {"anchor": {"path": "/m/anchor", "sha256": "a" * 64},
                        "augment": {"path": "/m/augment", "sha256": "b" * 64},
                        "augment_1": {"path": "/m/second", "sha256": "c" * 64}},
        "connections": [[0, -1], [1, 0], [3, 2], [0, 0], [2, 2]],
        "bridge_sources": [0, 0, 0, 1, 1],
        "config": {"composition": {"relative_scale": True}},
    }
    meta.update(changes)
    return meta


def test_composition_from_meta_splits_the_bridges_by_augmenting_model():
    composition = composition_from_meta(_meta(tokenizer="/data/tokenizer"))
    assert composition.anchor == BaseModelRef("/m/anchor", "a" * 64)
    assert composition.augments == (BaseModelRef("/m/augment", "b" * 64), BaseModelRef("/m/second", "c" * 64))
    assert composition.connections == (((0, -1), (1, 0), (3, 2)), ((0, 0), (2, 2)))
    assert composition.relative_scale and composition.tokenizer == "/data/tokenizer"


def test_composition_from_meta_reads_the_resolved_composition_when_recorded():
    recorded = {"connections": [[[0, -1], [1, 0], [3, 2]], [[0, 0], [2, 2]]], "relative_scale": False, "seed": 0}
    composition = composition_from_meta(_meta(composition=recorded, connections=None, bridge_sources=None))
    assert composition.connections == (((0, -1), (1, 0), (3, 2)), ((0, 0), (2, 2)))
    assert not composition.relative_scale


def test_composition_from_meta_of_one_augmenting_model_and_of_a_missing_one():
    single = composition_from_meta(_meta(connections=[[1, 1], [3, 2]], bridge_sources=None))
    assert single.augments == (BaseModelRef("/m/augment", "b" * 64),) and single.tokenizer is None
    assert single.connections == (((1, 1), (3, 2)),)
    meta = _meta()
    del meta["base_models"]["augment_1"]
    with pytest.raises(ValueError, match=r"no base model for \['augment_1'\]"):
        composition_from_meta(meta)


def test_export_of_a_sharded_checkpoint_loads_the_hugging_face_way(project, tmp_path):
    job = prepared_job(project, tmp_path, "train.max_steps=2", "checkpoint.every_steps=2")
    root = str(tmp_path / "ckpt")
    spawn(composition_run, 2, (runtime_inputs(job, root, job_identity(job)),), tmp_path / "out")
    store = CheckpointStore(root)
    assert export_main(["--checkpoints", root, "--out", str(tmp_path / "export")]) == 0

    model = CALMForCausalLM.from_pretrained(tmp_path / "export")
    trained = consolidated_composition(store, store.latest())
    exported = model.calm.composition_state_dict()
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[key], trained[key]) for key in trained)
    assert model.config.anchor["sha256"] == weights_checksum(project.anchor)
    assert model.config.calm_metadata["step"] == 2
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    batch = tokenizer(["red cat =>", "big dog runs =>"], return_tensors="pt", padding=True)
    assert model.generate(**batch, max_new_tokens=3, do_sample=False).shape[0] == 2
    assert export_main(["--checkpoints", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
