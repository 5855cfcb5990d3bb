"""The paper's baselines and the rows beyond it: extra rows of the table, each trained on D_C with the
composition's budget (train.*: steps, batch size, schedule, the same batches) in the driver process
after the job, and evaluated like CALM (the three tasks, plus KV-Arithmetic over held-in keys).

- ``lora``: LoRA on the anchor (peft) with as many trainable parameters as the composition;
- ``calm_random_augment``: CALM whose m_A is untrained: m_A's architecture and the initial weights its
  pretraining starts from;
- ``calm_vanilla_augment``: CALM whose m_A has m_A's architecture, settings and seed but is trained on
  Numeric-Arithmetic (m_B's data) instead of the keys;
- ``calm_two_augments`` (beyond the paper): CALM over m_B and two models like m_A, each trained on
  KV-Substitution over one half of the keys (neither knows every key);
- ``calm_different_tokenizer`` (beyond the paper): CALM over m_B and a model like m_A that reads
  characters (its own tokenizer) while m_B reads words, composed through the generic job's path for such
  a model: ``prepare_job`` finds its tokenizer, the data pipeline tokenises D_C and the evaluation sets
  once more with it (with each token's end offset, cached beside the job's data), and the bridges read
  its tokens aligned by character offsets (``calm_statistics`` over ``anchor_layout`` batches).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import data_pipeline as dp
from calm_dist.config import Config, ModelSource, composition_seed
from calm_dist.identity import weights_checksum
from calm_dist.model.composed import CompositionSpec
from calm_dist.model.layers import model_shape
from calm_dist.optim import OptimSettings
from calm_dist.train.evaluate import BatchStatistics, calm_statistics, causal_lm_statistics, evaluate_set
from calm_dist.train.job import prepare_job
from calm_dist.train.loop import train_loop
from calm_dist.train.models import load_causal_lm
from calm_dist.train.report import MetricsLogger

from .augment_variants import character_task, half_key_name, half_key_tasks
from .base_models import TrainingRecord, Vocabulary, build_model
from .models import augment_task, vanilla_augment_task
from .pretrain import ensure_trained, tokenised
from .results import ROW_LABELS, BaselineResult, LoraChoice, RowAugment, evaluate_scores
from .settings import BaselineSettings, RecipeSettings
from .task_data import TaskFiles
from .tokenizer import load_tokenizer

LORA, RANDOM_AUGMENT, VANILLA_AUGMENT = "lora", "calm_random_augment", "calm_vanilla_augment"
TWO_AUGMENTS, DIFFERENT_TOKENIZER = "calm_two_augments", "calm_different_tokenizer"
FLAGS = {LORA: "lora", RANDOM_AUGMENT: "random_augment", VANILLA_AUGMENT: "vanilla_augment",
         TWO_AUGMENTS: "two_augments", DIFFERENT_TOKENIZER: "different_tokenizer"}  # row -> recipe.baselines.*
LORA_PARAMETER_TOLERANCE = 0.05  # largest relative gap between LoRA's and the composition's trainable parameters


def enabled_rows(baselines: BaselineSettings) -> list[str]:
    return [row for row, flag in FLAGS.items() if getattr(baselines, flag)]


def metrics_filename(row: str) -> str:
    return f"metrics_{row}.jsonl"


def count_trainable(parameters) -> int:
    return sum(p.numel() for p in parameters if p.requires_grad)


@dataclass(frozen=True)
class RowInputs:
    """What every row is built from: the job's models, data, composition and run directory."""

    config: Config
    settings: RecipeSettings
    files: TaskFiles
    data: dp.PreparedData  # the job's tokenised D_C and evaluation sets
    composition: CompositionSpec  # the job's connections and bridge seed
    anchor_dir: Path
    augment_dir: Path
    run_dir: Path
    composition_parameters: int  # trainable parameters of the job's composition


def trained_augment(path: Path, kind: str, seed: int, **extra) -> RowAugment:
    """The facts of an m_A variant a row trained (and cached) for itself."""
    record = TrainingRecord.read(path)
    return RowAugment(kind, seed, str(path), weights_checksum(path), record.trained_on, record.seconds,
                      record.final_loss, **extra)


def _lora_model(anchor, rank: int, baselines: BaselineSettings):
    from peft import LoraConfig, get_peft_model

    settings = LoraConfig(r=rank, lora_alpha=baselines.lora_alpha_per_rank * rank, lora_dropout=0.0, bias="none",
                          target_modules=baselines.lora_target_modules or "all-linear", task_type="CAUSAL_LM")
    return get_peft_model(anchor, settings)


def build_lora(anchor, composition_parameters: int, baselines: BaselineSettings, seed: int):
    """LoRA on ``anchor`` (modified in place) at the rank whose trainable-parameter count is closest to
    the composition's (LoRA's count is linear in the rank); returns (model, LoraChoice)."""
    per_rank = count_trainable(_lora_model(copy.deepcopy(anchor), 1, baselines).parameters())
    rank = max(1, round(composition_parameters / per_rank))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _lora_model(anchor, rank, baselines)
    parameters = count_trainable(model.parameters())
    gap = abs(parameters - composition_parameters) / composition_parameters
    if gap > LORA_PARAMETER_TOLERANCE:
        raise ValueError(
            f"config key 'recipe.baselines.lora_target_modules': LoRA on {baselines.lora_target_modules or 'every linear layer'} "
            f"has {per_rank} trainable parameters per rank, so no rank comes within {LORA_PARAMETER_TOLERANCE:.0%} of "
            f"the composition's {composition_parameters} (rank {rank}: {parameters}); target other modules")
    modules = sorted({name.rsplit(".", 1)[-1] for name in model.base_model.targeted_module_names})
    return model, LoraChoice(rank, baselines.lora_alpha_per_rank * rank, modules,
                             len(model.base_model.targeted_module_names), parameters, composition_parameters,
                             round(gap, 4))


def train_row(inputs: RowInputs, row: str, statistics: BatchStatistics, parameters: list,
              data: dp.PreparedData | None = None) -> None:
    """Trains ``parameters`` on D_C with the composition's budget and batches; one record per step in
    the row's own metrics file and TensorBoard directory. ``data``: D_C as the row reads it (default the
    job's), its batches carrying every augmenting model's own tokenisation."""
    config, data = inputs.config, data or inputs.data
    reader = dp.ShardedReader(data.train, config.train.batch_size, seed=composition_seed(config),
                              pad_id=data.pad_id,
                              layout=dp.anchor_layout(data.augment_columns, data.pad_ids))
    (inputs.run_dir / metrics_filename(row)).unlink(missing_ok=True)  # rows never resume: a rerun logs afresh
    logger = MetricsLogger(inputs.run_dir, metrics_filename(row), tensorboard_dir=f"tensorboard/{row}")
    tokens = [0]

    def loss(batch):
        batch_statistics = statistics(batch)
        tokens[0] = batch_statistics.tokens
        return batch_statistics.mean_loss

    try:
        train_loop(loss, parameters, reader, OptimSettings.of(config.train), description=ROW_LABELS[row],
                   on_step=lambda step, value, lr: logger.log({"step": step, "loss": value, "lr": lr,
                                                              "tokens": tokens[0]}))
    finally:
        logger.close()


def _anchor(inputs: RowInputs):
    return load_causal_lm(inputs.anchor_dir, "anchor.model.path")


def _calm(inputs: RowInputs, augments: list, composition: CompositionSpec | None = None):
    """CALM over a fresh copy of the job's anchor and ``augments``, with the job's composition."""
    spec = composition or inputs.composition
    return spec.build(_anchor(inputs), augments, [model_shape(model) for model in augments])


def _train_and_score(inputs: RowInputs, row: str, model, statistics: BatchStatistics, started: float,
                     data: dp.PreparedData | None = None, **facts) -> BaselineResult:
    trainable = [p for p in model.parameters() if p.requires_grad]
    train_row(inputs, row, statistics, trainable, data)
    model.eval()
    scores = evaluate_scores(statistics, data or inputs.data, inputs.config.eval.batch_size, heldin=True)
    return BaselineResult(row, scores, count_trainable(trainable), round(time.perf_counter() - started, 1), **facts)


def run_lora(inputs: RowInputs, started: float) -> BaselineResult:
    model, choice = build_lora(_anchor(inputs), inputs.composition_parameters, inputs.settings.baselines,
                               inputs.composition.seed)
    # The anchor stays in eval mode (no dropout) as it does inside CALM; LoRA itself has no dropout.
    return _train_and_score(inputs, LORA, model, causal_lm_statistics(model), started, lora=choice)


def _run_calm_over(inputs: RowInputs, row: str, models: list, facts: list[RowAugment], started: float,
                   composition: CompositionSpec | None = None) -> BaselineResult:
    model = _calm(inputs, models, composition)
    model.train()
    return _train_and_score(inputs, row, model, calm_statistics(model), started, augments=tuple(facts))


def run_random_augment(inputs: RowInputs, started: float) -> BaselineResult:
    task = augment_task(inputs.config, inputs.settings, inputs.files)
    vocabulary = Vocabulary.of(load_tokenizer(inputs.files.tokenizer_dir))
    augment = build_model(inputs.settings.augment.model, vocabulary, task.seed, task.max_positions).eval()
    return _run_calm_over(inputs, RANDOM_AUGMENT, [augment], [RowAugment("untrained", task.seed)], started)


def run_vanilla_augment(inputs: RowInputs, started: float) -> BaselineResult:
    task = vanilla_augment_task(inputs.config, inputs.settings, inputs.files)
    (path,) = ensure_trained([task], inputs.config.run.threads)
    augment = load_causal_lm(path, "the vanilla m_A")
    return _run_calm_over(inputs, VANILLA_AUGMENT, [augment],
                          [trained_augment(path, "numeric_arithmetic", task.seed)], started)


def run_two_augments(inputs: RowInputs, started: float) -> BaselineResult:
    tasks = half_key_tasks(inputs.config, inputs.settings, inputs.files)
    paths = ensure_trained(tasks, inputs.config.run.threads)
    augments = [load_causal_lm(path, f"the m_A of {half_key_name(index)}") for index, path in enumerate(paths)]
    pairs = inputs.composition.connections[0]
    per_model = CompositionSpec((pairs,) * len(augments), inputs.composition.relative_scale, inputs.composition.seed)
    facts = [trained_augment(path, half_key_name(index), task.seed)
             for index, (task, path) in enumerate(zip(tasks, paths))]
    return _run_calm_over(inputs, TWO_AUGMENTS, augments, facts, started, per_model)


def different_tokenizer_job(inputs: RowInputs, augment_dir: Path):
    """The job's config with the character-level m_A (its tokenizer saved in its directory) in m_A's place,
    prepared as the generic job prepares any config: the tokenizer is found to differ from the anchor's, and
    D_C and the evaluation sets get the model's own tokenisation (``aug0_*`` columns, cached)."""
    augment = dataclasses.replace(inputs.config.augment[0], model=ModelSource(str(augment_dir)))
    job = prepare_job(dataclasses.replace(inputs.config, augment=[augment]))
    if job.data.augment_columns != ("aug0",):
        raise RuntimeError(f"the character-level m_A at {augment_dir} should read its own tokenisation, but the job "
                           f"reads {job.data.augment_columns}: its tokenizer was taken for the anchor's")
    return job


def run_different_tokenizer(inputs: RowInputs, started: float) -> BaselineResult:
    task = character_task(inputs.config, inputs.settings, inputs.files)
    (path,) = ensure_trained([task], inputs.config.run.threads)
    augment = load_causal_lm(path, "the character-level m_A")
    characters = load_tokenizer(task.tokenizer_dir)
    own_data = tokenised(task)  # its KV-Substitution evaluation set, in characters
    alone = evaluate_set(causal_lm_statistics(augment), own_data.eval_dir("eval"), "eval",
                         inputs.config.eval.batch_size, own_data.pad_id).exact_match
    job = different_tokenizer_job(inputs, path)
    # the job's connections and bridge seed; the model reads its own tokens
    composition = dataclasses.replace(inputs.composition, own_tokenizer=job.models.composition.own_tokenizer)
    model = _calm(inputs, [augment], composition)
    model.train()
    facts = trained_augment(path, "characters", task.seed, vocab_size=len(characters), kv_substitution_alone=alone)
    return _train_and_score(inputs, DIFFERENT_TOKENIZER, model, calm_statistics(model, job.data.augment_columns),
                            started, job.data, augments=(facts,))


RUNNERS: dict[str, Callable[[RowInputs, float], BaselineResult]] = {
    LORA: run_lora, RANDOM_AUGMENT: run_random_augment, VANILLA_AUGMENT: run_vanilla_augment,
    TWO_AUGMENTS: run_two_augments, DIFFERENT_TOKENIZER: run_different_tokenizer,
}


def run_baselines(inputs: RowInputs) -> list[BaselineResult]:
    """The enabled rows, in the table's order (each trains its own m_A first where it needs one)."""
    return [RUNNERS[row](inputs, time.perf_counter()) for row in enabled_rows(inputs.settings.baselines)]
