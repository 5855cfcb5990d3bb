"""The composition stage on the distributed runtime, launched by torchrun (and reused by Ray).

Launch rank 0 (anchor rank 0) prepares data and base models and publishes them in the rendezvous
store; every rank then runs its role; anchor rank 0 logs metrics, consolidates the bridges and
evaluates in one process.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from calm_dist.checkpoint import ResumePoint, prepare_checkpointing
from calm_dist.config import Config
from calm_dist.distributed.anchor_worker import CheckpointReport, StepReport
from calm_dist.distributed.groups import env_store, leave_process_groups
from calm_dist.distributed.worker import RunInputs, run_worker
from calm_dist.train.report import EventLog, MetricsLogger, loss_curve
from calm_dist.train.task_data import TaskData

_INPUTS_KEY = "calm/run_inputs"


def _publish(store, inputs: RunInputs) -> None:
    payload = {"run_dir": str(inputs.run_dir), "data": str(inputs.task_data.directory),
               "model_dirs": {side: str(path) for side, path in inputs.model_dirs.items()},
               "checkpoints": inputs.checkpoints, "checkpoint_meta": inputs.checkpoint_meta,
               "resume": dataclasses.asdict(inputs.resume) if inputs.resume else None}
    store.set(_INPUTS_KEY, json.dumps(payload))


def _receive(store, config: Config) -> RunInputs:
    import data_pipeline as dp

    store.wait([_INPUTS_KEY], datetime.timedelta(hours=2))  # rank 0 may be pretraining the base models
    payload = json.loads(store.get(_INPUTS_KEY))
    data_dir = Path(payload["data"])
    task_data = TaskData(data_dir, dp.load_manifest(data_dir, check_rows=False))
    resume = ResumePoint(**payload["resume"]) if payload["resume"] else None
    return RunInputs(config, task_data, {k: Path(v) for k, v in payload["model_dirs"].items()}, Path(payload["run_dir"]),
                     payload["checkpoints"], payload["checkpoint_meta"], resume)


class StepLogger:
    """The driver's view of the job: one progress bar, metrics.jsonl / TensorBoard, events.jsonl."""

    def __init__(self, run_dir: Path, total_steps: int):
        self.metrics = MetricsLogger(run_dir)
        self.events = EventLog(run_dir / "events.jsonl")
        self.bar = tqdm(total=total_steps, desc="composition (distributed)", dynamic_ncols=True)

    def __call__(self, report: StepReport | CheckpointReport) -> None:
        if isinstance(report, CheckpointReport):
            self.events.log({"event": "checkpoint", "step": report.step, "name": report.name,
                             "seconds": round(report.seconds, 4), "time": round(report.finished_at, 3)})
            return
        record = {"step": report.step, "loss": report.loss, "lr": report.lr, "tokens": report.tokens,
                  "step_s": round(report.step_s, 4), "tokens_per_s": round(report.tokens / report.step_s, 1),
                  "anchor_wait_fraction": round(report.wait_s / report.step_s, 4),
                  "bytes_received": report.bytes_received, "time": round(report.finished_at, 3),
                  "anchor_ranks": report.anchor_ranks}
        self.metrics.log(record)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{report.loss:.4f}", wait=f"{record['anchor_wait_fraction']:.0%}")

    def note(self, message: str) -> None:
        """A line for the operator that the progress bar does not overwrite, also kept in events.jsonl."""
        self.bar.write(message)
        self.events.log({"event": "note", "message": message, "time": round(time.time(), 3)})

    def rewind(self, step: int) -> None:
        """Training restarts after ``step``: later records are dropped, the bar goes back."""
        self.metrics.rewind(step)
        self.bar.n = step
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()


def consolidated_bridges(model) -> dict[str, torch.Tensor]:
    """Full composition weights gathered from the ZeRO-3 partitions (every anchor rank must call it)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.bridges.parameters())):
        return {name: tensor.detach().clone().float() for name, tensor in model.composition_state_dict().items()}


def evaluate_on_rank_zero(inputs: RunInputs, bridges: dict, curve, timer, extra: dict | None = None) -> Path:
    from calm_dist.train.job import build_job_model, finish_run

    model = build_job_model(inputs.config, inputs.model_dirs, inputs.task_data)
    model.load_composition_state_dict(bridges)
    return finish_run(inputs.config, model.eval(), inputs.task_data, inputs.model_dirs, inputs.run_dir, curve, timer,
                      extra)


def prepare_models_and_data(config: Config, timer):
    """(run dir, task data, model dirs of the anchor and every augmenting model), resumable when
    checkpointing is on."""
    from calm_dist.train.job import prepare_run

    return prepare_run(config, timer, resumable=config.checkpoint.every_steps > 0)


def run_torchrun_job(config: Config) -> Path | None:
    """Every launched rank calls this; returns the run directory on launch rank 0, else None."""
    from calm_dist.train.job import Timer

    timer = Timer()
    store, rank, world_size = env_store(config.parallel.timeout_s)
    if rank == 0:
        run_dir, task_data, model_dirs = prepare_models_and_data(config, timer)
        checkpoints, identity, resume = prepare_checkpointing(config, run_dir, model_dirs)
        inputs = RunInputs(config, task_data, model_dirs, run_dir, checkpoints.uri if checkpoints else None,
                           identity, resume)
        _publish(store, inputs)
    else:
        inputs = _receive(store, config)
    logger = StepLogger(inputs.run_dir, config.train.max_steps) if rank == 0 else None
    if logger is not None and inputs.resume is not None:
        logger.rewind(inputs.resume.step)
        logger.note(f"resuming from checkpoint {inputs.resume.name} (step {inputs.resume.step})")
    try:
        result = run_worker(inputs, rank, world_size, store, on_step=logger)
    finally:
        if logger is not None:
            logger.close()
    bridges = consolidated_bridges(result["model"]) if "model" in result else None
    leave_process_groups()
    if bridges is None:  # an augment stage: done
        return None
    if rank != 0:
        return None
    timer.mark("composition")
    return evaluate_on_rank_zero(inputs, bridges, loss_curve(inputs.run_dir), timer)
