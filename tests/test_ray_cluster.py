"""Ray orchestration on a simulated 3-node cluster: placement by role, parity, fast infeasibility errors."""
import copy
import time

import pytest
import torch

from launcher.runtime import runtime_inputs
from launcher.simulated_cluster import simulated_cluster
from tests.user_project import prepared_job, single_process_run

pytestmark = pytest.mark.timeout(400)
NODES = [{"num_cpus": 1, "resources": {"anchor": 1}}, {"num_cpus": 1, "resources": {"anchor": 1}},
         {"num_cpus": 1, "resources": {"augment": 1}}]


@pytest.fixture(scope="module")
def job(project, tmp_path_factory):
    return prepared_job(project, tmp_path_factory.mktemp("ray"), "parallel.timeout_s=90", "parallel.anchor_ranks=2",
                        "ray.anchor_resources={anchor: 1}", "ray.augment_resources={augment: 1}")


@pytest.fixture(scope="module")
def cluster():
    with simulated_cluster(NODES) as running:
        yield running


def test_roles_are_placed_by_resource_and_match_the_single_process_run(job, cluster):
    from calm_dist.reports import EvalReport, StepReport
    from launcher.ray_cluster import reserve
    from launcher.ray_driver import run_composition_on_ray

    reports = []
    outcome = run_composition_on_ray(job.config, runtime_inputs(job), reports.append, reserve(job.config))
    nodes = [node_id for node_id, _, _ in outcome["placement"]]
    assert nodes[0] != nodes[1] and nodes[2] not in nodes[:2]
    node_resources = {node["NodeID"]: node["Resources"] for node in __import__("ray").nodes()}
    assert node_resources[nodes[0]].get("anchor") and node_resources[nodes[1]].get("anchor")
    assert node_resources[nodes[2]].get("augment")
    reference, reference_evals, _ = single_process_run(job)
    losses = outcome["result"]["losses"]
    assert [r.step for r in reports if isinstance(r, StepReport)] == list(range(1, 7))  # the driver saw every step
    assert max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-4
    evaluations = {(r.step, r.name): r for r in reports if isinstance(r, EvalReport)}
    assert set(evaluations) == set(reference_evals) == {(0, "eval"), (6, "eval")}
    assert max(abs(evaluations[key].loss - reference_evals[key].loss) for key in evaluations) <= 1e-5
    assert set(outcome["result"]["bridges"]) and all(torch.isfinite(t).all() for t in outcome["result"]["bridges"].values())


def test_infeasible_plan_fails_fast_naming_what_is_missing(job, cluster):
    from launcher.ray_cluster import check_feasible

    config = copy.deepcopy(job.config)
    config.parallel.anchor_ranks = 3
    started = time.perf_counter()
    with pytest.raises(ValueError, match="anchor"):
        check_feasible(config)
    config.parallel.anchor_ranks, config.ray.cpus_per_worker = 2, 4
    with pytest.raises(ValueError, match="CPU"):
        check_feasible(config)
    assert time.perf_counter() - started < 10


def test_worker_processes_are_named_after_their_role(cluster):
    import ray

    from launcher.ray_cluster import worker_class

    actor = worker_class("anchor-rank-1").options(num_cpus=0).remote()
    node_id, _, _ = ray.get(actor.node_address.remote())
    pid = ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()))
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        title = handle.read().replace(b"\0", b" ").decode()
    assert "AnchorRank1" in title
    ray.kill(actor)


def test_a_path_a_node_does_not_see_is_refused_before_any_worker(job, cluster, tmp_path):
    import ray

    from launcher.ray_cluster import check_paths_on_every_node, reserve

    group = reserve(job.config)
    try:
        check_paths_on_every_node(group, 3, [str(tmp_path)])
        with pytest.raises(ValueError, match=rf"node 127\.0\.0\.\d does not see {tmp_path / 'elsewhere'}.*run.cache_dir"):
            check_paths_on_every_node(group, 3, [str(tmp_path), str(tmp_path / "elsewhere")])
    finally:
        ray.util.remove_placement_group(group)
