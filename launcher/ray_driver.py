"""Ray for a composition run: joins the cluster ($RAY_ADDRESS, as `ray job submit` sets it) or starts an
embedded local Ray, starts one actor per rank in a reserved placement group, streams their reports."""
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


class WorkerLost(RuntimeError):
    """A worker process or its node died (the role is named); the job can restart without it."""


class Restart(Exception):
    """Raised by a report handler to stop the workers so that the job restarts (e.g. to grow back)."""


def _drain(queue, logger) -> None:
    restart = None
    for report in queue.get_nowait_batch(queue.qsize()) if queue.qsize() else []:
        try:
            logger(report)
        except Restart as request:  # every report of the batch is logged first
            restart = request
    if restart is not None:
        raise restart


def _drain_after_stop(queue, logger) -> None:
    """Reports the workers sent before they were stopped: a restart rewinds to its checkpoint, and every
    step up to a published checkpoint was reported before it."""
    try:
        _drain(queue, logger)
    except Restart:
        pass


def _wait_all(futures, actors, queue, logger, names: list[str]) -> list[dict]:
    """Streams step reports while the workers run; the first failure (or a Restart) stops every worker."""
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
    except Exception as error:
        death = _actor_death(futures, names) if isinstance(error, ray.exceptions.RayError) else None
        for actor in actors:
            ray.kill(actor, no_restart=True)
        _drain_after_stop(queue, logger)
        if death is not None:
            raise death from error
        raise


def _actor_death(futures, names: list[str], within_s: float = 2.0) -> WorkerLost | None:
    """When a worker dies its peers fail too (e.g. a gloo read error); the death is the cause to report."""
    import ray

    ready, _ = ray.wait(list(futures), num_returns=len(futures), timeout=within_s)
    for future in ready:
        try:
            ray.get(future)
        except ray.exceptions.RayActorError as death:
            detail = str(death).strip().splitlines()[0][:200]
            return WorkerLost(f"{names[futures.index(future)]} died: {detail}")
        except Exception:  # noqa: BLE001  (a peer's consequential error)
            continue
    return None


def run_composition_on_ray(config: Config, inputs, on_report, group) -> dict:
    """One actor per rank in the reserved placement group; returns anchor rank 0's result and the
    placement. The group is released when this returns or raises."""
    import ray
    from ray.util.placement_group import remove_placement_group
    from ray.util.queue import Queue

    from calm_dist.distributed.worker import plan
    from launcher.ray_cluster import check_paths_on_every_node, start_workers
    from launcher.runtime import shared_paths

    queue = None
    try:
        topology, _ = plan(inputs)
        names = [topology.role_of(rank).name for rank in range(topology.world_size)]
        check_paths_on_every_node(group, topology.world_size, shared_paths(inputs))
        actors = start_workers(config, group, names)
        _, master_ip, master_port = ray.get(actors[0].node_address.remote())
        queue = Queue(actor_options={"num_cpus": 0})
        futures = [actor.run.remote(inputs, rank, topology.world_size, (master_ip, master_port),
                                    queue if rank == 0 else None) for rank, actor in enumerate(actors)]
        results = _wait_all(futures, actors, queue, on_report, names)
        placement = ray.get([a.node_address.remote() for a in actors])
        for actor in actors:
            ray.kill(actor, no_restart=True)
        return {"result": results[0], "placement": placement}
    finally:
        if queue is not None:
            queue.shutdown(force=True)
        remove_placement_group(group)
