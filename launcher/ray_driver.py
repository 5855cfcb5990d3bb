"""Ray for a composition run: joins the cluster ($RAY_ADDRESS, as `ray job submit` sets it) or starts an
embedded local Ray, starts one actor per rank in a reserved placement group, streams their reports."""
from __future__ import annotations

import contextlib
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
    # The workers' gloo connections (inherited through the raylet's environment) stay on loopback too.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    with _loopback_node():
        ray.init(include_dashboard=config.ray.embedded_dashboard, dashboard_host=config.ray.dashboard_host,
                 log_to_driver=True, object_store_memory=200 * 1024 * 1024)
    return True


@contextlib.contextmanager
def _loopback_node():
    """An embedded Ray that listens on 127.0.0.1 only (GCS, raylet, agents, workers, metrics).

    Ray binds every server to loopback when the node's address is 127.0.0.1, but on Linux it replaces
    127.0.0.1 by the machine's outward address unless multi-machine clusters are switched off, as Ray
    does on macOS and Windows (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray reads it once, at import, so
    its flag is set too, for the time of ray.init; the processes ray.init starts inherit the variable).
    """
    from ray._private import ray_constants

    variable = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(variable), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[variable], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved_env


def _loopback_interface() -> str:
    """The name of the interface holding 127.0.0.1 (``lo`` on Linux, ``lo0`` on macOS)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(address.address == "127.0.0.1" for address in addresses):
            return name
    return "lo"


class WorkerLost(RuntimeError):
    """A worker process or its node died, or lost its peers (the role is named); the job can restart without it."""


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
    """Streams step reports while the workers run; the first failure (or a Restart) stops every worker.

    A lost process or node (and its peers' consequential communication errors) is raised as WorkerLost,
    which a restart can fix; an error raised by worker code is raised as it is (see ``classify_failure``).
    """
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
        cause = _failure_cause(error, futures, names) if isinstance(error, ray.exceptions.RayError) else error
        for actor in actors:
            ray.kill(actor, no_restart=True)
        _drain_after_stop(queue, logger)
        if cause is error:
            raise
        raise cause from error


def _failure_cause(first: Exception, futures, names: list[str], within_s: float = 2.0) -> Exception:
    """Every worker's error within ``within_s`` of the first one, classified together: when one rank
    dies its peers fail too (a gloo read error), and a rank whose code raises closes its connections."""
    import ray

    ready, _ = ray.wait(list(futures), num_returns=len(futures), timeout=within_s)
    errors: dict[str, Exception] = {}
    for future in ready:
        try:
            ray.get(future)
        except Exception as error:  # noqa: BLE001  (each is classified below)
            errors[names[futures.index(future)]] = error
    return classify_failure(errors or {"a worker": first})


def is_loss(error: BaseException) -> bool:
    """A worker process or its node is gone: what a restart on the cluster left can fix."""
    import ray.exceptions as rex

    return isinstance(error, (WorkerLost, rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError,
                              rex.LocalRayletDiedError, rex.ObjectLostError, rex.OutOfMemoryError))


# What torch.distributed raises when a peer's process, node or connection is gone (gloo raises a plain
# RuntimeError naming its transport; NCCL and the rendezvous store raise DistError subclasses).
_COMMUNICATION_MARKERS = ("gloo/transport", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
                          "Socket Timeout", "NCCL error", "ncclRemoteError")


def is_communication_error(error: BaseException) -> bool:
    """An error from talking to a peer (a consequence of a loss elsewhere), not from the worker's own work."""
    import ray.exceptions as rex
    from torch.distributed import DistError

    cause = error.cause if isinstance(error, rex.RayTaskError) else error
    return isinstance(cause, DistError) or any(marker in str(cause) for marker in _COMMUNICATION_MARKERS)


def classify_failure(errors: dict[str, Exception]) -> Exception:
    """The failure to report for a job whose workers raised ``errors`` (by role name).

    A lost process or node anywhere -> WorkerLost naming it. Otherwise an error raised by worker code (a
    bad path, a config or data error) -> that error, as it is: a restart would fail the same way. Only
    communication errors (peers cut off, e.g. by a network fault) -> WorkerLost.
    """
    for name, error in errors.items():
        if is_loss(error):
            return error if isinstance(error, WorkerLost) else WorkerLost(f"{name} died: {_first_line(error)}")
    for error in errors.values():
        if not is_communication_error(error):
            return error
    name, error = next(iter(errors.items()))
    return WorkerLost(f"{name} lost its connection to its peers: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


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
