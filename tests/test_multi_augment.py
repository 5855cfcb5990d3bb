"""Several augmenting models on the distributed runtime: config, parity with one process, resume checks."""
import copy
import json

import pytest
import torch

from calm_dist.checkpoint import check_resumable, run_identity
from calm_dist.config import load_config
from calm_dist.distributed.worker import RunInputs
from calm_dist.train.augmenting_models import dir_key, extra_augment_dirs, planned_world_size
from tests.dist_helpers import spawn
from tests.dist_workers import composition_run
from tests.multi_augment_helpers import prepare_two_augments, single_process_multi

STEPS = 10


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_two_augments(tmp_path_factory.mktemp("multi"), STEPS)


@pytest.mark.parametrize("override,needle", [
    ("extra_augments=[{path: /m, stages: 0}]", r"extra_augments\[0\].stages"),
    ("extra_augments=[{path: /m}, {path: /n, stagez: 1}]", r"extra_augments\[1\].stagez"),
    ("extra_augments=[{stages: 1}]", r"extra_augments\[0\].path"),
    ("extra_augments=[{path: /m}, {path: /n, stages: two}]", r"extra_augments\[1\].stages"),
    ("extra_augments=[{path: /m, connections: [[1]]}]", r"extra_augments\[0\].connections\[0\]"),
    ("extra_augments=[3]", r"extra_augments\[0\]"),
])
def test_bad_extra_augments_name_the_key(override, needle):
    with pytest.raises(ValueError, match=needle):
        load_config(None, [override])


def test_extra_augments_load_and_size_the_world(tmp_path):
    extras = f"extra_augments=[{{path: {tmp_path}, stages: 3}}, {{path: /m, connections: [[0, 1]]}}]"
    config = load_config(None, ["parallel.anchor_ranks=2", "parallel.augment_stages=2", extras])
    assert [(e.stages, e.connections) for e in config.extra_augments] == [(3, None), (1, [[0, 1]])]
    assert planned_world_size(config) == 2 + 2 + 3 + 1
    with pytest.raises(ValueError, match=r"extra_augments\[0\].path.*holds no saved Hugging Face model"):
        extra_augment_dirs(config)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("extra_stages", [1, 2])
def test_two_augmenting_models_match_the_single_process_composition(prepared, tmp_path, extra_stages):
    config, task_data, model_dirs = prepared
    config = copy.deepcopy(config)
    config.extra_augments[0].stages = extra_stages
    reference_losses, reference_bridges = single_process_multi(config, task_data, model_dirs)
    results = spawn(composition_run, planned_world_size(config), (RunInputs(config, task_data, model_dirs),), tmp_path)
    extra_roles = [f"augment1-stage-{stage}" for stage in range(extra_stages)]
    assert [r["role"] for r in results] == ["anchor-rank-0", "augment-stage-0", *extra_roles]
    losses = results[0]["losses"]
    print(f"1 anchor rank + 1 + {extra_stages} stages: max |distributed - single-process| loss over {STEPS} steps: "
          f"{max(abs(a - b) for a, b in zip(losses, reference_losses)):.2e}")
    assert len(losses) == len(reference_losses) == STEPS and reference_losses[0] != reference_losses[-1]
    assert max(abs(a - b) for a, b in zip(losses, reference_losses)) <= 1e-4
    assert len(reference_bridges) == len(results[0]["bridges"])  # 3 + 3 bridges' weights
    for name, tensor in reference_bridges.items():
        assert torch.allclose(results[0]["bridges"][name], tensor, atol=1e-5), name
    assert all(result["bytes_sent"] > 0 for result in results[2:])


def test_resume_refuses_a_changed_or_added_extra_augment(prepared):
    config, _, model_dirs = prepared
    identity = run_identity(config, model_dirs)
    assert set(identity["base_models"]) == {"anchor", "augment", dir_key(1)}
    meta = json.loads(json.dumps({"step": 4, **identity}))
    check_resumable(meta, identity)
    meta["base_models"][dir_key(1)]["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="augment_1 model .*sha256 000000000000"):
        check_resumable(meta, identity)
    single = {"step": 4, **run_identity(config, {k: v for k, v in model_dirs.items() if k != dir_key(1)})}
    with pytest.raises(ValueError, match=r"base models \['anchor', 'augment'\], this run has"):
        check_resumable(single, identity)
    rewired = copy.deepcopy(identity)
    rewired["config"]["extra_augments"][0]["connections"] = [[0, 0]]
    with pytest.raises(ValueError, match=r"extra_augments\[0\].connections"):
        check_resumable({"step": 4, **identity}, rewired)


def test_local_launcher_composes_every_augmenting_model(prepared, tmp_path):
    """run.launcher=local takes extra_augments too: one process, the same per-step losses."""
    from calm_dist.train.job import run_job

    config, task_data, model_dirs = prepared
    local = copy.deepcopy(config)
    local.run.launcher, local.run.output_dir, local.run.threads = "local", str(tmp_path), 1
    run_dir = run_job(local)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reference, _ = single_process_multi(config, task_data, model_dirs)
    assert losses == pytest.approx(reference, abs=1e-4)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert set(summary["base_models"]) == {"anchor", "augment", "augment_1"}
    assert len(summary["connections"]) == len(config.composition.connections) + len(config.extra_augments[0].connections)
