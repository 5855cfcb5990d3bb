"""Several augmenting models on the distributed runtime: config, parity with one process, resume checks."""
import copy
import dataclasses

import pytest
import torch

from calm_dist.checkpoint import check_resumable
from calm_dist.config import load_config
from launcher.runtime import job_identity, runtime_inputs, world_size
from tests.dist_helpers import spawn
from tests.dist_workers import composition_run
from tests.user_project import prepared_job, save_second_augment, single_process_run

STEPS = 8
SECOND_CONNECTIONS = [[2, 0], [0, -1], [1, 1]]  # its last layer (2) is tapped after the final norm


def two_augments(project, stages: int = 1) -> str:
    second = save_second_augment(project)
    return (f"augment=[{{model: {{path: {project.augment}}}}}, "
            f"{{model: {{path: {second}}}, connections: {SECOND_CONNECTIONS}, stages: {stages}}}]")


@pytest.fixture(scope="module")
def job(project, tmp_path_factory):
    return prepared_job(project, tmp_path_factory.mktemp("multi"), f"train.max_steps={STEPS}", two_augments(project))


@pytest.fixture(scope="module")
def reference(job):
    return single_process_run(job)


def test_several_augmenting_models_size_the_world(project):
    config = load_config(None, ["parallel.anchor_ranks=2", "parallel.augment_stages=2", two_augments(project, 3)])
    assert [(a.stages, a.connections) for a in config.augment] == [(None, None), (3, SECOND_CONNECTIONS)]
    assert world_size(config) == 2 + 2 + 3


@pytest.mark.timeout(300)
@pytest.mark.parametrize("second_stages", [1, 2])
def test_two_augmenting_models_match_the_single_process_composition(job, reference, tmp_path, second_stages):
    reference_losses, reference_evals, reference_bridges = reference
    inputs = runtime_inputs(job)
    inputs = dataclasses.replace(inputs, augments=(inputs.augments[0],
                                                   dataclasses.replace(inputs.augments[1], stages=second_stages)))
    results = spawn(composition_run, inputs.world_size, (inputs,), tmp_path)
    second_roles = [f"augment1-stage-{stage}" for stage in range(second_stages)]
    assert [r["role"] for r in results] == ["anchor-rank-0", "augment-stage-0", *second_roles]
    losses = results[0]["losses"]
    print(f"1 anchor rank + 1 + {second_stages} stages: max |distributed - single-process| loss over {STEPS} steps: "
          f"{max(abs(a - b) for a, b in zip(losses, reference_losses)):.2e}")
    assert len(losses) == len(reference_losses) == STEPS and reference_losses[0] != reference_losses[-1]
    assert max(abs(a - b) for a, b in zip(losses, reference_losses)) <= 1e-4
    assert len(reference_bridges) == len(results[0]["bridges"])
    for name, tensor in reference_bridges.items():
        assert torch.allclose(results[0]["bridges"][name], tensor, atol=1e-5), name
    assert all(result["bytes_sent"] > 0 for result in results[2:])


def test_resume_refuses_a_changed_added_or_rewired_augmenting_model(job, project, tmp_path):
    identity = job_identity(job)
    assert set(identity["base_models"]) == {"anchor", "augment", "augment_1"}
    meta = {"step": 4, **copy.deepcopy(identity)}
    check_resumable(meta, identity)
    meta["base_models"]["augment_1"]["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="augment_1 model .*sha256 000000000000"):
        check_resumable(meta, identity)
    single = job_identity(prepared_job(project, tmp_path, f"train.max_steps={STEPS}"))
    with pytest.raises(ValueError, match=r"base models \['anchor', 'augment'\], this run has"):
        check_resumable({"step": 4, **single}, identity)
    rewired = copy.deepcopy(identity)
    rewired["composition"]["connections"][1] = [[0, 0]]
    with pytest.raises(ValueError, match="the composition"):
        check_resumable({"step": 4, **identity}, rewired)
