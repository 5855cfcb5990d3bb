"""From a prepared job to the distributed runtime's inputs, and back to the job's results."""
from __future__ import annotations

from pathlib import Path

from calm_dist.checkpoint import prepare_checkpointing, run_identity
from calm_dist.config import Config, augment_stages, composition_seed, stages_key, to_dict
from calm_dist.distributed.worker import AugmentModelInputs, RunInputs, RuntimeData, plan
from calm_dist.train.job import PreparedJob


def world_size(config: Config) -> int:
    """Ranks of the distributed plan: the anchor ranks plus every augmenting model's stages."""
    return config.parallel.anchor_ranks + sum(augment_stages(config, i) for i in range(len(config.augment)))


def base_model_dirs(job: PreparedJob) -> dict[str, str]:
    """``{"anchor": dir, "augment": dir, "augment_1": dir, ...}``: the names checkpoints and exports use."""
    dirs = {"anchor": str(job.models.anchor_dir)}
    for index, path in enumerate(job.models.augment_dirs):
        dirs["augment" if index == 0 else f"augment_{index}"] = str(path)
    return dirs


def job_identity(job: PreparedJob) -> dict:
    return run_identity(base_model_dirs(job), job.models.composition.to_dict(), job.data.fingerprint,
                        to_dict(job.config), str(job.models.tokenizer_dir))


def _absolute(path) -> str:
    return str(Path(path).resolve())


def runtime_inputs(job: PreparedJob, checkpoints: str | None = None, identity: dict | None = None,
                   resume=None) -> RunInputs:
    """Every path absolute, resolved once here: each worker reads exactly these."""
    config = job.config
    augments = tuple(AugmentModelInputs(_absolute(path), augment_stages(config, index), stages_key(config, index))
                     for index, path in enumerate(job.models.augment_dirs))
    data = RuntimeData(_absolute(job.data.train),
                       {name: _absolute(job.data.eval_dir(name)) for name in job.data.eval_names}, job.data.pad_id,
                       job.data.augment_columns, job.data.pad_ids)
    if checkpoints is not None and "://" not in checkpoints:
        checkpoints = _absolute(checkpoints)
    return RunInputs(config.train, config.eval, config.parallel, config.deepspeed, config.checkpoint,
                     composition_seed(config),
                     _absolute(job.models.anchor_dir), augments, job.models.composition, data, checkpoints, identity,
                     resume)


def shared_paths(inputs: RunInputs) -> list[str]:
    """What every worker must see at the same path."""
    paths = [inputs.anchor_path, *(model.path for model in inputs.augments), inputs.data.train,
             *inputs.data.evals.values()]
    if inputs.checkpoints is not None and "://" not in inputs.checkpoints:
        paths.append(inputs.checkpoints)
    return paths


def prepare_runtime(job: PreparedJob) -> tuple[RunInputs, object]:
    """The runtime's inputs with the resume point, after the plan and the checkpoints are checked; returns
    (inputs, checkpoint store or None). Raises ValueError before any worker starts."""
    plan(runtime_inputs(job))  # the topology: stage counts against layers, wire slots
    identity = job_identity(job) if job.resumable else None
    store, point = prepare_checkpointing(job.config.checkpoint, job.run_dir, identity, job.config.parallel.anchor_ranks)
    return runtime_inputs(job, store.uri if store else None, identity, point), store


def resumed_note(point) -> str:
    return (f"resuming from checkpoint {point.name} (step {point.step}, written by {point.saved_ranks} anchor ranks)")


__all__ = ["shared_paths", "base_model_dirs", "job_identity", "prepare_runtime", "resumed_note", "runtime_inputs",
           "world_size"]
