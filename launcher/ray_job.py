"""The job through Ray: checks and data in the driver, then the composition and its evaluations on Ray
workers (restarted elastically after failures), then the run's results.

    launcher.train.run -> run_ray_job -> elastic.run_elastic -> ray_driver.run_composition_on_ray
        -> one RankWorker actor per rank (ray_cluster) -> calm_dist.distributed.worker.run_worker
"""
from __future__ import annotations

from pathlib import Path

from calm_dist.config import Config


def run_ray_job(config: Config) -> Path:
    """The job through Ray: checks and data in the driver, composition and evaluation on Ray workers."""
    from calm_dist.train.job import Timer, open_run_dir, prepare_job, write_results
    from launcher.elastic import run_elastic
    from launcher.ray_cluster import check_feasible
    from launcher.ray_driver import connect
    from launcher.reporting import StepLogger
    from launcher.runtime import prepare_runtime

    timer = Timer()
    job = prepare_job(config)
    inputs, store = prepare_runtime(job)
    embedded = connect(config)
    try:
        check_feasible(config)
    except ValueError:
        if embedded:  # started only to learn this machine's capacity
            import ray

            ray.shutdown()
        raise
    run_dir = open_run_dir(job)
    if inputs.checkpoints is not None and "://" not in inputs.checkpoints:
        Path(inputs.checkpoints).mkdir(parents=True, exist_ok=True)  # so every node can be asked whether it sees it
    timer.mark("data")
    extra = {"launcher": "ray", "placement": {"embedded": embedded}}
    logger = StepLogger(run_dir, config.train.max_steps)
    try:
        outcome = run_elastic(config, inputs, logger, store)
    finally:
        logger.close()
    nodes = [node_id for node_id, _, _ in outcome["placement"]]
    print(f"placement ({'embedded local Ray' if embedded else 'cluster'}): "
          + ", ".join(f"rank {rank} on node {node[:8]}" for rank, node in enumerate(nodes)), flush=True)
    extra["placement"]["nodes_by_rank"] = nodes
    extra["restarts"] = outcome["restarts"]
    timer.mark("composition")
    results = write_results(job, outcome["result"]["bridges"], timer, extra)
    print(results.table(), flush=True)
    return run_dir
