"""Ray placement and worker actors for the distributed runtime.

One placement group per job with a bundle per role; each rank is an actor whose class name carries its
role and index (``ray::AnchorRank1.run`` in ``ps``) and which runs the runtime's worker code unchanged.
Activations go over torch.distributed between the actors, never through the object store.
"""
from __future__ import annotations

import math
import os
import socket
from collections import Counter

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from calm_dist.config import Config


def role_bundles(config: Config) -> list[dict[str, float]]:
    """Bundles in rank order: anchor ranks first, then every augmenting model's stages (the topology's layout)."""
    base = {"CPU": config.ray.cpus_per_worker}
    if config.ray.gpus_per_worker:
        base["GPU"] = config.ray.gpus_per_worker
    anchor = {**base, **config.ray.anchor_resources}
    augment = {**base, **config.ray.augment_resources}
    from launcher.runtime import world_size

    augment_stages = world_size(config) - config.parallel.anchor_ranks
    return [dict(anchor) for _ in range(config.parallel.anchor_ranks)] + [dict(augment) for _ in range(augment_stages)]


def _plan_in_words(config: Config) -> str:
    from calm_dist.config import augment_stages, stages_key

    stages = " + ".join(f"{stages_key(config, i)}={augment_stages(config, i)}" for i in range(len(config.augment)))
    return f"parallel.anchor_ranks={config.parallel.anchor_ranks} + {stages}"


def missing_resources(bundles: list[dict[str, float]], nodes: list[dict[str, float]], strategy: str) -> list[str]:
    """What the cluster lacks for the plan (empty when it fits), by first-fit over node totals."""
    free = [dict(node) for node in nodes]
    missing: list[str] = []
    taken: set[int] = set()  # STRICT_SPREAD: one bundle per node
    for index, bundle in enumerate(bundles):
        placed = False
        for node_index, node in enumerate(free):
            if strategy == "STRICT_SPREAD" and node_index in taken:
                continue
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] -= v
                taken.add(node_index)
                placed = True
                break
        if not placed:
            missing.append(f"bundle {index} {bundle}")
    return missing


def check_feasible(config: Config) -> list[dict[str, float]]:
    """Raises a ValueError naming what is missing before anything is placed."""
    bundles = role_bundles(config)
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    totals = Counter()
    for node in nodes:
        totals.update(node)
    needed = Counter()
    for bundle in bundles:
        needed.update(bundle)
    short = {k: v - totals.get(k, 0.0) for k, v in needed.items() if totals.get(k, 0.0) + 1e-9 < v}
    unplaceable = missing_resources(bundles, nodes, config.ray.placement_strategy)
    if short or unplaceable:
        detail = f"missing in total: {short}" if short else f"no node can hold: {', '.join(unplaceable[:4])}"
        raise ValueError(
            f"the cluster cannot hold {_plan_in_words(config)} workers with bundles {bundles[0]} "
            f"(anchor) / {bundles[-1]} (augment): {detail}; cluster has {dict(totals)}. "
            "Add nodes, or lower the plan or ray.cpus_per_worker / ray.*_resources."
        )
    return bundles


def reserve(config: Config, timeout_s: float | None = None):
    """A ready placement group for the plan; ValueError when it does not fit or stays pending."""
    bundles = check_feasible(config)
    timeout_s = config.ray.placement_timeout_s if timeout_s is None else timeout_s
    group = placement_group(bundles, strategy=config.ray.placement_strategy, name="")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as error:
        remove_placement_group(group)
        raise ValueError(f"placement of {bundles} did not complete in {timeout_s:.0f} s "
                         "(ray.placement_timeout_s); the cluster may be busy") from error
    return group


class RankWorker:
    """One rank of the job. Subclassed per role and index so process titles name them."""

    def node_address(self) -> tuple[str, str, int]:
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), port

    def run(self, inputs, rank: int, world_size: int, master: tuple[str, int], reports=None) -> dict:
        from calm_dist.distributed.accelerator import choose_deepspeed_accelerator

        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        choose_deepspeed_accelerator()
        import torch

        from calm_dist.distributed.groups import env_store, leave_process_groups
        from calm_dist.distributed.worker import run_worker
        from calm_dist.distributed.zero_anchor import gathered_composition_state
        from calm_dist.quiet import quiet_libraries

        quiet_libraries()
        torch.set_num_threads(max(1, math.ceil(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        store, _, _ = env_store(inputs.parallel.timeout_s)
        result = run_worker(inputs, rank, world_size, store, on_report=reports.put if reports is not None else None)
        bridges = gathered_composition_state(result["model"]) if "model" in result else None
        leave_process_groups()
        if "model" not in result:
            return {"role": result["role"]}
        return {"role": result["role"], "losses": result["losses"], "bridges": bridges if rank == 0 else None}


def worker_class(role_name: str):
    """A Ray actor class named after the role, e.g. ``AnchorRank1``, ``AugmentStage0`` or ``Augment1Stage0``."""
    name = "".join(part.capitalize() for part in role_name.split("-"))
    return ray.remote(type(name, (RankWorker,), {}))


def actor_options(bundle: dict[str, float]) -> dict:
    """Ray actor options asking for exactly a bundle's resources (CPU/GPU go in their own arguments)."""
    rest = dict(bundle)
    options = {"num_cpus": rest.pop("CPU", 0), "num_gpus": rest.pop("GPU", 0)}
    if rest:
        options["resources"] = rest
    return options


@ray.remote(num_cpus=0)
def _missing_paths(paths: list[str]) -> tuple[str, list[str]]:
    return ray.util.get_node_ip_address(), [path for path in paths if not os.path.exists(path)]


def check_paths_on_every_node(group, bundles: int, paths: list[str]) -> None:
    """ValueError naming the first path a node of the placement group cannot see, before any worker starts.
    The driver resolved every path to an absolute one on its own machine; every worker reads the same."""
    probes = [_missing_paths.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=group, placement_group_bundle_index=index)).remote(paths) for index in range(bundles)]
    for node, missing in ray.get(probes):
        if missing:
            raise ValueError(
                f"node {node} does not see {missing[0]} (nor {len(missing) - 1} more of the run's paths): on a "
                "multi-node cluster the model paths, run.cache_dir (the tokenised data), run.output_dir and "
                "checkpoint.dir must be on a filesystem every node mounts at the same absolute path "
                "(checkpoint.dir may also be an s3:// URI); relative paths are resolved on the driver's machine")


def start_workers(config: Config, group, role_names: list[str]) -> list:
    actors = []
    for index, (name, bundle) in enumerate(zip(role_names, role_bundles(config))):
        strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)
        options = dict(actor_options(bundle), scheduling_strategy=strategy, max_restarts=0)
        actors.append(worker_class(name).options(**options).remote())
    return actors
