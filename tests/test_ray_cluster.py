"""Ray orchestration on a simulated 3-node cluster: placement by role, parity, fast infeasibility errors."""
import copy
import time

import pytest
import torch

from calm_dist.config import load_config
from calm_dist.distributed.worker import RunInputs
from calm_dist.train.pretrain import ensure_base_models
from calm_dist.train.task_data import prepare_task_data
from launcher.simulated_cluster import simulated_cluster
from tests.test_distributed_parity import single_process

pytestmark = pytest.mark.timeout(400)
NODES = [{"num_cpus": 1, "resources": {"anchor": 1}}, {"num_cpus": 1, "resources": {"anchor": 1}},
         {"num_cpus": 1, "resources": {"augment": 1}}]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    config = load_config("configs/tiny.yaml", [
        f"run.cache_dir={cache}", "train.max_steps=6", "train.batch_size=8", "parallel.timeout_s=90",
        "composition.connections=[[0, -1], [1, 0], [1, 1]]", "parallel.anchor_ranks=2", "parallel.augment_stages=1",
        "ray.anchor_resources={anchor: 1}", "ray.augment_resources={augment: 1}"])
    task_data = prepare_task_data(config)
    return config, task_data, ensure_base_models(config, task_data)


@pytest.fixture(scope="module")
def cluster():
    with simulated_cluster(NODES) as running:
        yield running


def test_roles_are_placed_by_resource_and_match_the_single_process_loss(prepared, cluster, tmp_path):
    from launcher.ray_cluster import reserve
    from launcher.ray_driver import run_composition_on_ray

    config, task_data, model_dirs = prepared
    reports = []
    outcome = run_composition_on_ray(config, RunInputs(config, task_data, model_dirs, tmp_path), reports.append,
                                     reserve(config))
    nodes = [node_id for node_id, _, _ in outcome["placement"]]
    assert nodes[0] != nodes[1] and nodes[2] not in nodes[:2]
    node_resources = {node["NodeID"]: node["Resources"] for node in __import__("ray").nodes()}
    assert node_resources[nodes[0]].get("anchor") and node_resources[nodes[1]].get("anchor")
    assert node_resources[nodes[2]].get("augment")
    reference, _ = single_process(config, task_data, model_dirs)
    losses = outcome["result"]["losses"]
    assert [r.step for r in reports] == list(range(1, 7))  # the driver saw every step
    assert max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-4
    assert set(outcome["result"]["bridges"]) and all(torch.isfinite(t).all() for t in outcome["result"]["bridges"].values())


def test_infeasible_plan_fails_fast_naming_what_is_missing(prepared, cluster, tmp_path):
    from launcher.ray_cluster import check_feasible

    config = copy.deepcopy(prepared[0])
    config.parallel.anchor_ranks = 3
    started = time.perf_counter()
    with pytest.raises(ValueError, match="anchor"):
        check_feasible(config)
    config.parallel.anchor_ranks, config.ray.cpus_per_worker = 2, 4
    with pytest.raises(ValueError, match="CPU"):
        check_feasible(config)
    assert time.perf_counter() - started < 10


def test_worker_processes_are_named_after_their_role(prepared, cluster):
    import ray

    from launcher.ray_cluster import worker_class

    actor = worker_class("anchor-rank-1").options(num_cpus=0).remote()
    node_id, _, _ = ray.get(actor.node_address.remote())
    pid = ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()))
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        title = handle.read().replace(b"\0", b" ").decode()
    assert "AnchorRank1" in title
    ray.kill(actor)
