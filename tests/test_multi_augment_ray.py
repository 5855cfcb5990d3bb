"""The two-augment plan through the Ray driver on a simulated 2-node cluster: placement, checkpoints, resume,
export."""
import copy
import json

import pytest
import torch

from calm_dist.checkpoint import CheckpointStore
from calm_dist.export import load_exported
from calm_dist.train.augmenting_models import dir_key
from calm_dist.train.report import read_jsonl
from launcher.export import export, parse_args
from launcher.simulated_cluster import simulated_cluster
from tests.multi_augment_helpers import prepare_two_augments, save_extra_augment

STEPS = 6
NODES = [{"num_cpus": 1, "resources": {"anchor": 1}}, {"num_cpus": 1, "resources": {"augment": 2}}]


@pytest.mark.timeout(300)
def test_two_augmenting_models_train_on_ray_and_a_changed_one_is_not_resumed(tmp_path):
    import ray

    from launcher.ray_driver import run_ray_job

    config, task_data, _ = prepare_two_augments(tmp_path, STEPS, overrides=(
        f"run.output_dir={tmp_path / 'runs'}", "checkpoint.every_steps=3", "eval.batch_size=32",
        "ray.anchor_resources={anchor: 1}", "ray.augment_resources={augment: 1, CPU: 0.5}"))
    with simulated_cluster(NODES):
        run_dir = run_ray_job(config)
        resources = {node["NodeID"]: node["Resources"] for node in ray.nodes()}
        changed = copy.deepcopy(config)
        changed.extra_augments[0].path = str(save_extra_augment(task_data, tmp_path / "other_extra", seed=12))
        with pytest.raises(ValueError, match=r"augment_1 model .*\(sha256"):
            run_ray_job(changed)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    nodes = summary["placement"]["nodes_by_rank"]
    assert len(nodes) == 3 and resources[nodes[0]].get("anchor")
    assert nodes[1] == nodes[2] and resources[nodes[1]].get("augment")  # both models' stages on the augment node
    assert [record["step"] for record in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, STEPS + 1))
    assert json.loads((run_dir / "results.json").read_text())["calm"]
    assert set(summary["base_models"]) == {"anchor", "augment", dir_key(1)}
    store = CheckpointStore(str(run_dir / "checkpoints"))
    meta = store.meta(store.latest())
    assert meta["step"] == STEPS and meta["bridge_sources"] == [0, 0, 0, 1, 1, 1]
    assert meta["base_models"][dir_key(1)]["path"] == config.extra_augments[0].path
    exported = load_exported(export(parse_args(["--run", str(run_dir), "--out", str(tmp_path / "export")])))
    assert len(exported.augments) == 2 and exported.bridge_sources == [0, 0, 0, 1, 1, 1]
    for name, tensor in torch.load(run_dir / "composition.pt").items():  # the bridges the run evaluated
        torch.testing.assert_close(exported.composition_state_dict()[name], tensor)
