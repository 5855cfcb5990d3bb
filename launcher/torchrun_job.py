"""The job under torchrun: launch rank 0 checks and prepares everything (a recipe's data and models too)
and hands the runtime's inputs to every rank through the rendezvous store; every rank then runs its role;
anchor rank 0 writes the run's results."""
from __future__ import annotations

import datetime
import pickle
from pathlib import Path

from calm_dist.config import Config
from calm_dist.distributed.groups import env_store, leave_process_groups
from calm_dist.distributed.worker import run_worker

_INPUTS_KEY = "calm/run_inputs"
_FAILED = b"failed"


def _publish(store, payload) -> None:
    store.set(_INPUTS_KEY, pickle.dumps(payload))


def _receive(store):
    store.wait([_INPUTS_KEY], datetime.timedelta(hours=6))  # rank 0 may be preparing data or a recipe's models
    payload = pickle.loads(store.get(_INPUTS_KEY))
    if payload == _FAILED:
        raise SystemExit("launch rank 0 failed before training; its error is in its output")
    return payload


def run_torchrun_job(config: Config, recipe=None) -> Path | None:
    """Every launched rank calls this; returns the run directory on launch rank 0, else None."""
    from calm_dist.train.job import Timer, open_run_dir, prepare_job, write_results
    from calm_dist.distributed.zero_anchor import gathered_composition_state
    from launcher.reporting import StepLogger
    from launcher.runtime import prepare_runtime, resumed_note

    timer = Timer()
    store, rank, world_size = env_store(config.parallel.timeout_s)
    job = None
    if rank == 0:
        try:
            if recipe is not None:
                config = recipe.prepare(config)
            job = prepare_job(config)
            inputs, _ = prepare_runtime(job)
        except BaseException:
            _publish(store, _FAILED)
            raise
        _publish(store, inputs)
        open_run_dir(job)
        timer.mark("data")
    else:
        inputs = _receive(store)
    logger = StepLogger(job.run_dir, config.train.max_steps) if job is not None else None
    if logger is not None and inputs.resume is not None:
        from calm_dist.checkpoint import CheckpointStore

        logger.resume_at(inputs.resume, CheckpointStore(inputs.resume.store_uri), config.train.max_steps)
        logger.note(resumed_note(inputs.resume))
    try:
        result = run_worker(inputs, rank, world_size, store, on_report=logger)
    finally:
        if logger is not None:
            logger.close()
    bridges = gathered_composition_state(result["model"]) if "model" in result else None  # every anchor rank
    leave_process_groups()
    if rank != 0:
        return None
    timer.mark("composition")
    results = write_results(job, bridges, timer, {"launcher": "torchrun"})
    print(results.table(), flush=True)
    if recipe is not None:
        recipe.finish(config, job.run_dir)
    return job.run_dir
