"""Two augmenting models through the Ray driver on a simulated 2-node cluster: placement, checkpoints, resume,
export."""
import copy
import json

import pytest
import torch

from calm_dist.checkpoint import CheckpointStore
from calm_dist.export import load_exported
from calm_dist.train.report import read_jsonl
from launcher.export import export, parse_args
from launcher.simulated_cluster import simulated_cluster
from tests.test_multi_augment import two_augments
from tests.user_project import generic_config, save_second_augment, tiny_causal_lm

STEPS = 6
NODES = [{"num_cpus": 1, "resources": {"anchor": 1}}, {"num_cpus": 1, "resources": {"augment": 2}}]


@pytest.mark.timeout(300)
def test_two_augmenting_models_train_on_ray_and_a_changed_one_is_not_resumed(project, tmp_path):
    import ray

    from launcher.ray_job import run_ray_job

    config = generic_config(project, tmp_path, "run.launcher=ray", f"train.max_steps={STEPS}", "checkpoint.every_steps=3",
                            two_augments(project), "ray.anchor_resources={anchor: 1}",
                            "ray.augment_resources={augment: 1, CPU: 0.5}")
    with simulated_cluster(NODES):
        run_dir = run_ray_job(config)
        resources = {node["NodeID"]: node["Resources"] for node in ray.nodes()}
        changed = copy.deepcopy(config)
        other = tmp_path / "other_second"
        tiny_causal_lm("llama", len(project.tokenizer), hidden=24, layers=3, heads=2, seed=12,
                       eos_id=project.tokenizer.eos_token_id).save_pretrained(other)
        project.tokenizer.save_pretrained(other)
        changed.augment[1].model.path = str(other)
        with pytest.raises(ValueError, match=r"augment_1 model .*\(sha256"):
            run_ray_job(changed)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    nodes = summary["placement"]["nodes_by_rank"]
    assert len(nodes) == 3 and resources[nodes[0]].get("anchor")
    assert nodes[1] == nodes[2] and resources[nodes[1]].get("augment")  # both models' stages on the augment node
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] == list(range(1, STEPS + 1))
    assert json.loads((run_dir / "results.json").read_text())["calm"]["eval_loss"] > 0
    assert [entry["path"] for entry in summary["base_models"]["augment"]] == [str(project.augment),
                                                                              str(save_second_augment(project))]
    store = CheckpointStore(str(run_dir / "checkpoints"))
    meta = store.meta(store.latest())
    assert meta["step"] == STEPS and meta["bridge_sources"] == [0, 0, 1, 1, 1]
    assert meta["base_models"]["augment_1"]["path"] == config.augment[1].model.path
    exported = load_exported(export(parse_args(["--run", str(run_dir), "--out", str(tmp_path / "export")])))
    assert len(exported.augments) == 2 and exported.bridge_sources == [0, 0, 1, 1, 1]
    from safetensors.torch import load_file

    for name, tensor in load_file(str(run_dir / "export" / "composition.safetensors")).items():  # the bridges the run evaluated
        torch.testing.assert_close(exported.composition_state_dict()[name], tensor)
