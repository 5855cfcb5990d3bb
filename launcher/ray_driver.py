"""The Ray job driver: joins the cluster ($RAY_ADDRESS, as `ray job submit` sets it) or starts an
embedded local Ray, places the roles, streams one progress bar and metrics, evaluates the result."""
from __future__ import annotations

import os
import time
from pathlib import Path

from calm_dist.config import Config


def connect(config: Config) -> bool:
    """Joins a cluster if one is named, else starts a local one. Returns True when embedded."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray starts workers at nice 15; here they are the job's compute, so they run at normal priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(include_dashboard=config.ray.embedded_dashboard, dashboard_host=config.ray.dashboard_host,
             log_to_driver=True, object_store_memory=200 * 1024 * 1024)
    return True


def _drain(queue, logger) -> None:
    from calm_dist.distributed.anchor_worker import StepReport

    for report in queue.get_nowait_batch(queue.qsize()) if queue.qsize() else []:
        logger(StepReport(**report))


def _wait_all(futures, actors, queue, logger) -> list[dict]:
    """Streams step reports while the workers run; the first failure stops every worker."""
    import ray

    pending = list(futures)
    try:
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            _drain(queue, logger)
            for ready in [f for f in futures if f not in pending]:
                ray.get(ready)  # raises the worker's error at once
        _drain(queue, logger)
        return ray.get(futures)
    except Exception:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        raise


def run_composition_on_ray(config: Config, inputs, logger) -> dict:
    """Places one actor per rank, runs the runtime's workers, returns anchor rank 0's result."""
    import ray
    from ray.util.placement_group import remove_placement_group
    from ray.util.queue import Queue

    from calm_dist.distributed.worker import plan
    from launcher.ray_cluster import reserve, start_workers

    topology, _, _ = plan(inputs, config.parallel.anchor_ranks + config.parallel.augment_stages)
    group = reserve(config)
    try:
        names = [topology.role_of(rank).name for rank in range(topology.world_size)]
        actors = start_workers(config, group, names)
        _, master_ip, master_port = ray.get(actors[0].node_address.remote())
        queue = Queue(actor_options={"num_cpus": 0})
        futures = [actor.run.remote(inputs, rank, topology.world_size, (master_ip, master_port),
                                    queue if rank == 0 else None) for rank, actor in enumerate(actors)]
        results = _wait_all(futures, actors, queue, logger)
        return {"result": results[0], "placement": ray.get([a.node_address.remote() for a in actors])}
    finally:
        remove_placement_group(group)


def run_ray_job(config: Config) -> Path:
    """The job through Ray: data and base models in the driver, composition on Ray workers."""
    from calm_dist.distributed.worker import RunInputs
    from calm_dist.train.distributed_job import StepLogger, evaluate_on_rank_zero
    from calm_dist.train.job import Timer, prepare_run

    embedded = connect(config)
    timer = Timer()
    run_dir, task_data, model_dirs = prepare_run(config, timer)
    inputs = RunInputs(config, task_data, model_dirs, run_dir)
    logger = StepLogger(run_dir, config.train.max_steps)
    try:
        outcome = run_composition_on_ray(config, inputs, logger)
    finally:
        logger.close()
    timer.mark("composition")
    nodes = [node_id for node_id, _, _ in outcome["placement"]]
    print(f"placement ({'embedded local Ray' if embedded else 'cluster'}): "
          + ", ".join(f"rank {rank} on node {node[:8]}" for rank, node in enumerate(nodes)), flush=True)
    placement = {"embedded": embedded, "nodes_by_rank": nodes}
    return evaluate_on_rank_zero(inputs, outcome["result"]["bridges"], logger.curve, timer, {"placement": placement})
