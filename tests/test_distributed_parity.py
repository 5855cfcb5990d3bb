"""The distributed runtime (ZeRO-3 anchor ranks + augment pipeline stages) against its single-process twin,
on a user's own models and data: the same per-step losses, the same evaluations, the same bridges."""
import dataclasses

import pytest
import torch

from launcher.runtime import runtime_inputs
from tests.dist_helpers import spawn
from tests.dist_workers import aborting_run, composition_run, failing_run
from tests.user_project import prepared_job, single_process_run

STEPS = 8


@pytest.fixture(scope="module")
def job(project, tmp_path_factory):
    return prepared_job(project, tmp_path_factory.mktemp("parity"), f"train.max_steps={STEPS}", "eval.every_steps=4",
                        "eval.batch_size=5")


@pytest.fixture(scope="module")
def reference(job):
    return single_process_run(job)


def with_plan(job, anchor_ranks: int, stages: int):
    inputs = runtime_inputs(job)
    parallel = dataclasses.replace(inputs.parallel, anchor_ranks=anchor_ranks, augment_stages=stages)
    augments = tuple(dataclasses.replace(model, stages=stages) for model in inputs.augments)
    return dataclasses.replace(inputs, parallel=parallel, augments=augments)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("anchor_ranks,stages", [(1, 1), (2, 2)])
def test_distributed_matches_single_process(job, reference, tmp_path, anchor_ranks, stages):
    from calm_dist.reports import EvalReport

    reference_losses, reference_evals, reference_bridges = reference
    results = spawn(composition_run, anchor_ranks + stages, (with_plan(job, anchor_ranks, stages),), tmp_path)
    anchors = [r for r in results if "losses" in r]
    assert len(anchors) == anchor_ranks
    for result in anchors:  # every anchor rank reports the same global loss
        assert max(abs(a - b) for a, b in zip(result["losses"], reference_losses)) <= 1e-4
    assert len(reference_losses) == STEPS and reference_losses[0] != reference_losses[-1]
    evaluations = {(r.step, r.name): r for r in anchors[0]["reports"] if isinstance(r, EvalReport)}
    assert set(evaluations) == set(reference_evals) == {(0, "eval"), (4, "eval"), (8, "eval")}
    for key, expected in reference_evals.items():
        assert abs(evaluations[key].loss - expected.loss) <= 1e-5, key
        assert evaluations[key].totals.rows == expected.totals.rows == job.data.splits["eval"].rows
        assert evaluations[key].totals.exact_rows == expected.totals.exact_rows
    for name, tensor in reference_bridges.items():
        assert torch.allclose(anchors[0]["bridges"][name], tensor, atol=1e-5), name


@pytest.mark.timeout(300)
def test_bridges_with_position_logits_train_the_same_under_zero3_as_in_one_process(project, tmp_path):
    positioned = prepared_job(project, tmp_path / "job", f"train.max_steps={STEPS}", "eval.every_steps=8",
                              "eval.batch_size=5", "composition.position_buckets=4")
    reference_losses, _, reference_bridges = single_process_run(positioned)
    assert any(name.endswith("position_bias") for name in reference_bridges)
    results = spawn(composition_run, 3, (with_plan(positioned, 2, 1),), tmp_path / "run")
    anchors = [r for r in results if "losses" in r]
    assert len(anchors) == 2
    for result in anchors:
        assert max(abs(a - b) for a, b in zip(result["losses"], reference_losses)) <= 1e-4
    for name, tensor in reference_bridges.items():
        assert torch.allclose(anchors[0]["bridges"][name], tensor, atol=1e-5), name
    trained = [reference_bridges[name] for name in reference_bridges if name.endswith("position_bias")]
    assert any((bias[:, 0] != 8.0).any() for bias in trained)  # the logits moved from their start


@pytest.mark.timeout(300)
def test_a_failing_rank_fails_every_rank(job, tmp_path):
    with pytest.raises(Exception, match="injected failure on rank 1"):
        spawn(failing_run, 2, (with_plan(job, 1, 1), 1), tmp_path)


@pytest.mark.timeout(300)
def test_a_rank_killed_by_a_signal_fails_every_rank_and_shows_its_python_stack(job, tmp_path):
    with pytest.raises(RuntimeError, match="process 1 terminated with signal SIGABRT") as failure:
        spawn(aborting_run, 2, (with_plan(job, 1, 1), 1), tmp_path)
    assert "in aborting_run" in str(failure.value)
