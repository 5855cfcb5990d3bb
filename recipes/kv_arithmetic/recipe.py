"""The KV-arithmetic reproduction (CALM paper, section 4.1) as a recipe on the generic job.

``prepare`` generates the task's rows and tokenizer, trains m_A and m_B (both cached by fingerprint under
run.cache_dir) and points the config at them: the generic job then composes them on D_C like any
user's models and data, evaluating CALM on the named evaluation sets. ``finish`` evaluates m_A and m_B
alone on the same sets, runs the enabled baselines, prints the paper's table and adds its rows to
results.json.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import data_pipeline as dp
from calm_dist.config import Config, ModelSource
from calm_dist.train.evaluate import causal_lm_statistics
from calm_dist.train.job import data_spec
from calm_dist.train.models import load_causal_lm, plan_models
from calm_dist.train.report import loss_curve, plot_losses, read_jsonl, write_json_atomically

from .base_models import TrainingRecord
from .baselines import RowInputs, metrics_filename, run_baselines
from .models import anchor_task, augment_task
from .pretrain import ensure_trained
from .results import ROW_LABELS, KVResults, TaskScores, evaluate_scores
from .settings import check_framework_sections, recipe_settings
from .task_data import (
    COMPOSITION_TRAIN,
    KV_ARITHMETIC,
    NUMERIC_ARITHMETIC,
    TaskFiles,
    max_length,
    prepare_task_files,
)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What ``prepare`` made, as the job will read it."""

    files: TaskFiles
    anchor_dir: Path
    augment_dir: Path
    seconds: dict[str, float]  # wall time of each phase of the preparation


def job_config(config: Config, prepared: Prepared, longest: int) -> Config:
    """The config with the recipe's models and data filled in (rows of at most ``longest`` tokens); the
    framework's other settings as given. Paths are absolute: workers, checkpoints and exports find them
    from any working directory."""
    files = TaskFiles(prepared.files.directory.resolve())
    augment = dataclasses.replace(config.augment[0], model=ModelSource(str(prepared.augment_dir.resolve())))
    anchor = dataclasses.replace(config.anchor, model=ModelSource(str(prepared.anchor_dir.resolve())))
    data = dataclasses.replace(config.data, train=str(files.path(COMPOSITION_TRAIN)),
                               eval={name: str(files.path(name)) for name in files.eval_sets}, max_length=longest)
    return dataclasses.replace(config, anchor=anchor, augment=[augment], data=data)


class KVArithmeticRecipe:
    """``prepare(config) -> config`` before the job, ``finish(config, run_dir)`` after it."""

    def __init__(self):
        self.prepared: Prepared | None = None

    def prepare(self, config: Config, log=print) -> Config:
        settings = recipe_settings(config)
        check_framework_sections(config)
        started = time.perf_counter()
        files = prepare_task_files(config.run.cache_dir, settings.data, config.run.seed)
        data_done = time.perf_counter()
        augment_dir, anchor_dir = ensure_trained(
            [augment_task(config, settings, files), anchor_task(config, settings, files)], config.run.threads, log)
        seconds = {"task_data_s": round(data_done - started, 1),
                   "base_models_s": round(time.perf_counter() - data_done, 1)}
        self.prepared = Prepared(files, anchor_dir, augment_dir, seconds)
        log(f"{settings.name}: task data {files.directory}, m_A {augment_dir}, m_B {anchor_dir}")
        return job_config(config, self.prepared, max_length(settings.data))

    def finish(self, config: Config, run_dir: Path, log=print) -> KVResults:
        settings = recipe_settings(config)
        files = TaskFiles(Path(config.data.train).parent)
        generic = json.loads((run_dir / "results.json").read_text())
        tracked = tracked_exact_match(read_jsonl(run_dir / "metrics.jsonl"), files.eval_sets)
        plan, tokenizer = plan_models(config)
        data = dp.prepare_data(data_spec(config), tokenizer, config.run.cache_dir, log)  # the job's, cached
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        m_a = evaluate_alone(plan.augment_dirs[0], "augment[0].model.path", data, config.eval.batch_size)
        m_b = evaluate_alone(plan.anchor_dir, "anchor.model.path", data, config.eval.batch_size)
        seconds["base_model_eval_s"] = round(time.perf_counter() - started, 1)
        composition = plan.composition.build(load_causal_lm(plan.anchor_dir, "anchor.model.path"),
                                             [load_causal_lm(plan.augment_dirs[0], "augment[0].model.path")],
                                             [plan.augment_facts[0].shape])
        inputs = RowInputs(config, settings, files, data, plan.composition, plan.anchor_dir, plan.augment_dirs[0],
                           run_dir, sum(p.numel() for p in composition.trainable_parameters()))
        baselines = run_baselines(inputs)
        seconds.update({f"baseline_{b.row}_s": b.seconds for b in baselines})
        results = KVResults(m_a, m_b, TaskScores.from_job_metrics(generic["calm"]), tuple(baselines))
        write_json_atomically(run_dir / "results.json", {**generic, **_merged_rows(generic, results)})
        timings = self._record(run_dir, files, plan, results, tracked, seconds)
        plot_losses({**{f"{role} pretraining": TrainingRecord.read(path).curve()
                        for role, path in (("m_A", plan.augment_dirs[0]), ("m_B", plan.anchor_dir))},
                     **{ROW_LABELS[b.row]: loss_curve(run_dir, metrics_filename(b.row)) for b in baselines}},
                    run_dir / "recipe_losses.png")
        if any(len(points) > 2 for points in tracked.values()):
            log("exact match during training: " + "; ".join(
                f"{name} " + ", ".join(f"{step}: {value:.1f}" for step, value in points)
                for name, points in tracked.items()))
        log(results.table())
        log("timings: " + ", ".join(f"{name} {value:.0f}" for name, value in timings.items()))
        return results

    def _record(self, run_dir: Path, files: TaskFiles, plan, results: KVResults,
                tracked: dict[str, list[tuple[int, float]]], seconds: dict[str, float]) -> dict[str, float]:
        """The recipe's part of run_summary.json: its phases' wall time, base models and baselines."""
        path = run_dir / "run_summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        prepared = self.prepared.seconds if self.prepared is not None else {}
        job = {f"job_{name}": value for name, value in summary.get("timings", {}).items()}
        timings = {**prepared, **job, **seconds}
        summary["recipe"] = {
            "name": "kv_arithmetic", "task_data": str(files.directory), "key_counts": dataclasses.asdict(files.key_counts),
            "timings": timings,
            "base_models": {role: {"path": str(path), **_training_summary(path)}
                            for role, path in (("m_A", plan.augment_dirs[0]), ("m_B", plan.anchor_dir))},
            "baselines": {baseline.row: baseline.summary() for baseline in results.baselines},
            "exact_match_during_training": {name: [list(point) for point in points] for name, points in tracked.items()},
        }
        write_json_atomically(path, summary)
        return timings


def tracked_exact_match(records: list[dict], eval_sets: list[str]) -> dict[str, list[tuple[int, float]]]:
    """(step, exact match %) of every evaluation the job made of each KV-Arithmetic set and Numeric: step 0
    (m_B alone), every eval.every_steps, the end. Only the validation keys may choose anything."""
    names = [name for name in eval_sets if name.startswith(KV_ARITHMETIC) or name == NUMERIC_ARITHMETIC]
    return {name: [(r["step"], r[f"{name}_exact_match"]) for r in records if r.get("eval") == name] for name in names}


def evaluate_alone(model_dir: Path, key: str, data: dp.PreparedData, batch_size: int) -> TaskScores:
    """A base model's own scores on the job's evaluation sets (teacher-forced, as the job evaluates CALM)."""
    return evaluate_scores(causal_lm_statistics(load_causal_lm(model_dir, key)), data, batch_size)


def _training_summary(path: Path) -> dict:
    record = TrainingRecord.read(path)
    return {"trained_on": record.trained_on, "seconds": record.seconds, "final_loss": record.final_loss,
            "zeroed_embeddings": record.zeroed_embeddings}


def _merged_rows(generic: dict, results: KVResults) -> dict:
    """results.json's rows: the generic ``calm`` metrics keep their keys and gain the table's cells."""
    rows = results.rows()
    rows["calm"] = {**generic["calm"], **rows["calm"]}
    return rows


recipe = KVArithmeticRecipe()
