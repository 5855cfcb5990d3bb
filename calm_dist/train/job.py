"""The generic composition job: checks and data before anything runs, then (in one process, or through a
launcher's distributed runtime) training and evaluation, then what the run leaves behind.

    prepare_job   every check a config, its models and its data allow, then the tokenised data (cached);
                  writes nothing but the data cache
    open_run_dir  the run directory, once the launcher's own checks (plan, cluster, resume) passed
    write_results results.json, run_summary.json, the loss curves, the trained composition
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import yaml

import data_pipeline as dp
from calm_dist.config import Config, composition_seed, to_dict
from calm_dist.identity import weights_checksum
from calm_dist.reports import EvalReport, StepReport
from calm_dist.train.models import ModelPlan, load_causal_lm, plan_models
from calm_dist.train.report import (
    MetricsLogger,
    eval_curves,
    evaluations_at,
    loss_curve,
    plot_losses,
    read_jsonl,
    write_json_atomically,
)


@dataclass(frozen=True)
class PreparedJob:
    config: Config
    models: ModelPlan
    data: dp.PreparedData
    run_dir: Path  # where the run's outputs go (created by open_run_dir)

    @property
    def resumable(self) -> bool:
        return self.config.checkpoint.every_steps > 0


def data_spec(config: Config) -> dp.DataSpec:
    data = config.data
    if isinstance(data.eval, str):
        evals = {"eval": dp.DataSource("data.eval", data.eval)}
    else:
        evals = {name: dp.DataSource(f"data.eval.{name}", location) for name, location in (data.eval or {}).items()}
    return dp.DataSpec(dp.DataSource("data.train", data.train), evals, data.eval_fraction, dict(data.columns),
                       dp.TokenizeSettings(data.max_length, data.overlong), data.num_proc, config.run.seed)


def _check_rows(config: Config, data: dp.PreparedData) -> None:
    rows = data.splits["train"].rows
    if rows < config.train.batch_size:
        raise ValueError(f"config key 'train.batch_size': {config.train.batch_size} rows per step, but data.train has "
                         f"{rows} usable rows; lower train.batch_size or add data")


def run_dir_for(config: Config) -> Path:
    """runs/<name>-<time>; a resumable run (checkpointing on) uses runs/<name>, so a rerun finds its checkpoints."""
    base = Path(config.run.output_dir)
    if config.checkpoint.every_steps > 0:
        return base / config.run.name
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, suffix = base / f"{config.run.name}-{stamp}", 1
    while run_dir.exists():
        run_dir, suffix = base / f"{config.run.name}-{stamp}-{suffix}", suffix + 1
    return run_dir


def augment_tokenizers(models: ModelPlan) -> list[dp.AugmentTokenizer | None]:
    """Per augmenting model, its own tokenizer with its position limit (None: it reads the anchor's tokens)."""
    return [None if tokenizer is None else dp.AugmentTokenizer(tokenizer, facts.max_positions)
            for tokenizer, facts in zip(models.augment_tokenizers or [None] * len(models.augment_dirs),
                                        models.augment_facts)]


def prepare_job(config: Config, log=print) -> PreparedJob:
    """Every check of the config, its models, tokenizers and data; then the tokenised data. Raises
    ValueError/FileNotFoundError naming the config key before anything of a run is written."""
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    models, tokenizer = plan_models(config)
    data = dp.prepare_data(data_spec(config), tokenizer, config.run.cache_dir, log, augment_tokenizers(models))
    _check_rows(config, data)
    return PreparedJob(config, models, data, run_dir_for(config))


def open_run_dir(job: PreparedJob) -> Path:
    job.run_dir.mkdir(parents=True, exist_ok=job.resumable)
    (job.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(job.config), sort_keys=False))
    return job.run_dir


class Timer:
    """Wall time of each phase of a run, in order."""

    def __init__(self):
        self.started = self._last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[f"{phase}_s"] = now - self._last
        self._last = now

    def summary(self) -> dict:
        return {**{k: round(v, 1) for k, v in self.phases.items()},
                "total_s": round(time.perf_counter() - self.started, 1)}


def base_models_summary(models: ModelPlan) -> dict:
    return {"anchor": {"path": str(models.anchor_dir), "sha256": weights_checksum(models.anchor_dir)},
            "augment": [{"path": str(path), "sha256": weights_checksum(path)} for path in models.augment_dirs]}


@dataclass(frozen=True)
class RunResults:
    """results.json: every evaluation set's metrics at step 0 (the anchor alone) and after training."""

    anchor: dict
    calm: dict

    def table(self) -> str:
        names = sorted({key[: -len("_loss")] for key in self.calm if key.endswith("_loss")})
        lines = [f"| {'eval set':<20} | {'anchor loss':>11} | {'CALM loss':>9} | {'anchor exact':>12} | "
                 f"{'CALM exact':>10} |", "|" + "-" * 22 + "|" + "-" * 13 + "|" + "-" * 11 + "|" + "-" * 14 + "|"
                 + "-" * 12 + "|"]
        for name in names:
            lines.append(f"| {name:<20} | {self.anchor.get(f'{name}_loss', float('nan')):>11.4f} | "
                         f"{self.calm[f'{name}_loss']:>9.4f} | {self.anchor.get(f'{name}_exact_match', float('nan')):>11.1f}% | "
                         f"{self.calm[f'{name}_exact_match']:>9.1f}% |")
        return "\n".join(lines)


def results_of(run_dir: Path, max_steps: int) -> RunResults:
    records = read_jsonl(run_dir / "metrics.jsonl")
    final = evaluations_at(records, max_steps)
    if not final:
        raise RuntimeError(f"{run_dir / 'metrics.jsonl'} has no evaluation at step {max_steps}")
    return RunResults(evaluations_at(records, 0), final)


def export_composition(job: PreparedJob, composition_state: dict[str, torch.Tensor]) -> Path:
    """``<run dir>/export``: the trained bridges, the base models they belong to (path and sha256) and the
    anchor's tokenizer (and each augmenting model's own, where it has one), loadable with
    ``calm_dist.CALMForCausalLM.from_pretrained``."""
    from calm_dist.export import save_composition
    from calm_dist.model.hf import BaseModelRef
    from calm_dist.identity import weights_checksum

    def ref(path: Path) -> BaseModelRef:
        return BaseModelRef(str(path.resolve()), weights_checksum(path))

    models = job.models
    return save_composition(job.run_dir / "export", composition_state, ref(models.anchor_dir),
                            [ref(path) for path in models.augment_dirs], models.composition.connections,
                            relative_scale=models.composition.relative_scale,
                            position_buckets=models.composition.position_buckets, tokenizer=models.tokenizer_dir,
                            metadata={"run": job.config.run.name, "step": job.config.train.max_steps,
                                      "data": job.data.fingerprint},
                            # the plan decided each model's tokens: None = the anchor's ids
                            augment_tokenizers=list(models.augment_tokenizer_dirs)
                            or [None] * len(models.augment_dirs))


def write_results(job: PreparedJob, composition_state: dict[str, torch.Tensor], timer: Timer,
                  extra: dict | None = None) -> RunResults:
    """results.json, run_summary.json, loss_curves.png and the export of the trained composition, in the run
    directory."""
    run_dir, config = job.run_dir, job.config
    export_composition(job, composition_state)
    results = results_of(run_dir, config.train.max_steps)
    write_json_atomically(run_dir / "results.json", dataclasses.asdict(results))
    summary = {
        "timings": timer.summary(),
        "base_models": base_models_summary(job.models),
        "tokenizer": str(job.models.tokenizer_dir),
        "augment_tokenizers": [None if path is None else str(path) for path in job.models.augment_tokenizer_dirs],
        "composition": job.models.composition.to_dict(),
        "composition_parameters": sum(value.numel() for value in composition_state.values()),
        "data": {"directory": str(job.data.directory),
                 "splits": {name: dataclasses.asdict(split) for name, split in job.data.splits.items()}},
        **(extra or {}),
    }
    write_json_atomically(run_dir / "run_summary.json", summary)
    records = read_jsonl(run_dir / "metrics.jsonl")
    plot_losses({"composition": loss_curve(run_dir), **eval_curves(records)}, run_dir / "loss_curves.png")
    return results


def build_local_model(job: PreparedJob):
    """The composed model over the job's saved models, in this process; with ``deepspeed.bf16`` the frozen base
    models are loaded in bf16 (the bridges stay fp32: ``LoopSettings.bf16``), with
    ``deepspeed.activation_checkpointing`` the anchor's layers recompute in backward."""
    from calm_dist.model.layers import model_shape

    dtype = job.config.deepspeed.base_model_dtype
    anchor = load_causal_lm(job.models.anchor_dir, "anchor.model.path", dtype)
    augments = [load_causal_lm(path, f"augment[{index}].model.path", dtype)
                for index, path in enumerate(job.models.augment_dirs)]
    model = job.models.composition.build(anchor, augments, [model_shape(model) for model in augments])
    return model.checkpoint_activations() if job.config.deepspeed.activation_checkpointing else model


def run_local_job(config: Config, log=print) -> Path:
    """The whole job in this process (``run.launcher: local``); returns the run directory."""
    from calm_dist.train.local import LoopSettings, train_in_process

    timer = Timer()
    job = prepare_job(config, log)
    timer.mark("data")
    model = build_local_model(job)
    run_dir = open_run_dir(job)
    log(f"run directory: {run_dir}")
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # one process does not resume: a rerun starts afresh
    logger = MetricsLogger(run_dir)
    try:
        settings = LoopSettings(config.train, config.eval, composition_seed(config), config.deepspeed.bf16)
        train_in_process(model, job.data, settings, lambda report: logger.log(report.record()))
    finally:
        logger.close()
    timer.mark("composition")
    results = write_results(job, model.composition_state_dict(), timer, {"launcher": "local"})
    log(results.table())
    return run_dir


__all__ = ["EvalReport", "PreparedJob", "RunResults", "StepReport", "Timer", "data_spec", "open_run_dir",
           "prepare_job", "results_of", "run_dir_for", "run_local_job", "write_results"]
