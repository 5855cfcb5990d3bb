"""The default job end to end: data -> base models -> composition -> evaluation -> report."""
from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import torch
import yaml

from calm_dist.config import Config, to_dict
from calm_dist.model.composed import CALMModel
from calm_dist.train.augmenting_models import build_multi_composed, check_extra_vocabularies, extra_augment_dirs
from calm_dist.train.base_models import weights_checksum
from calm_dist.train.baselines import baseline_curves, enabled_rows, run_baselines
from calm_dist.train.composition import Evaluator, build_composed, train_composition
from calm_dist.train.pretrain import ensure_base_models, pretrain_summary
from calm_dist.train.report import MetricsLogger, format_table, plot_losses, read_jsonl, write_json_atomically
from calm_dist.train.task_data import prepare_task_data


def make_run_dir(config: Config, resumable: bool = False) -> Path:
    """runs/<name>-<time>; a resumable run (checkpointing on) uses runs/<name>, so a rerun finds its
    checkpoints."""
    if resumable:
        run_dir = Path(config.run.output_dir) / config.run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        return run_dir
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.run.output_dir) / f"{config.run.name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        run_dir = Path(config.run.output_dir) / f"{config.run.name}-{stamp}-{suffix}"
        suffix += 1
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return run_dir


def _base_curves(model_dirs: dict[str, Path]) -> dict[str, list[tuple[int, float]]]:
    curves = {}
    for side, label in (("augment", "m_A pretraining"), ("anchor", "m_B pretraining")):
        info_path = model_dirs[side] / "calm_dist_base.json"
        log = json.loads(info_path.read_text()).get("log", []) if info_path.is_file() else []
        curves[label] = [(r["step"], r["loss"]) for r in log]
    return curves


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


def prepare_run(config: Config, timer: Timer, resumable: bool = False):
    """Run directory, data and the directories of the anchor and every augmenting model: everything the
    composition needs, before any worker. Extra augmenting models are checked first, so a bad path fails
    before the base models are trained."""
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    extra_dirs = extra_augment_dirs(config)
    run_dir = make_run_dir(config, resumable)
    print(f"run directory: {run_dir}", flush=True)
    task_data = prepare_task_data(config)
    timer.mark("data")
    model_dirs = ensure_base_models(config, task_data)
    timer.mark("base_models")
    check_extra_vocabularies(config, task_data)
    return run_dir, task_data, {**model_dirs, **extra_dirs}


def build_job_model(config: Config, model_dirs: dict[str, Path], task_data) -> CALMModel:
    """CALM over the job's anchor and every augmenting model (``extra_augments`` included)."""
    if config.extra_augments:
        return build_multi_composed(config, model_dirs)
    return build_composed(config, model_dirs, task_data)


def finish_run(config: Config, model, task_data, model_dirs, run_dir: Path, curve, timer: Timer, extra=None) -> Path:
    """Evaluates m_A, m_B and CALM, then trains and evaluates the enabled baselines (config.baselines);
    writes results.json (before the baselines too), run_summary.json and the loss curves."""
    torch.save(model.composition_state_dict(), run_dir / "composition.pt")
    evaluator = Evaluator(config, task_data)
    results = evaluator.table(model)
    timer.mark("evaluation")
    write_json_atomically(run_dir / "results.json", results)
    composition_parameters = sum(p.numel() for p in model.trainable_parameters())
    baselines: dict = {}
    if enabled_rows(config):
        results.update(run_baselines(config, task_data, model_dirs, evaluator, run_dir, timer=timer, details=baselines,
                                     composition_parameters=composition_parameters))
        write_json_atomically(run_dir / "results.json", results)
    summary = {
        "timings": timer.summary(),
        "base_models": {side: {"path": str(path), "sha256": weights_checksum(path), **pretrain_summary(path)}
                        for side, path in model_dirs.items()},
        "composition_parameters": composition_parameters,
        "connections": model.connections,
        "data": str(task_data.directory),
        **({"baselines": baselines} if baselines else {}),
        **(extra or {}),
    }
    write_json_atomically(run_dir / "run_summary.json", summary)
    plot_losses({**_base_curves(model_dirs), "composition": curve, **baseline_curves(config, run_dir)},
                run_dir / "loss_curves.png")
    print(format_table(results), flush=True)
    print("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings"].items()), flush=True)
    return run_dir


def run_job(config: Config) -> Path:
    """Runs the whole job in this process and returns the run directory."""
    timer = Timer()
    run_dir, task_data, model_dirs = prepare_run(config, timer)
    model = build_job_model(config, model_dirs, task_data)
    logger = MetricsLogger(run_dir)
    try:
        curve = train_composition(model, config, task_data, logger, Evaluator(config, task_data))
    finally:
        logger.close()
    timer.mark("composition")
    return finish_run(config, model, task_data, model_dirs, run_dir, curve, timer)
