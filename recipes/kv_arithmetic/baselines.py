"""The paper's baselines: extra rows of the results, each trained on D_C with the composition's budget
(train.*: steps, batch size, schedule) in one process after the composition, and evaluated like the
other rows (the three tasks, plus KV-Arithmetic over held-in keys).

- ``lora``: LoRA on the anchor (peft) with as many trainable parameters as the composition;
- ``calm_random_augment``: CALM whose m_A is untrained: m_A's architecture and the initial weights its
  pretraining starts from;
- ``calm_vanilla_augment``: CALM whose m_A has m_A's architecture, settings and seed but is trained on
  Numeric-Arithmetic (m_B's data) instead of the keys;
- ``calm_two_augments`` and ``calm_different_tokenizer``: beyond the paper, see ``beyond_paper.py``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch

from calm_dist.config import BaselinesConfig, Config
from calm_dist.model.loss import causal_lm_loss
from calm_dist.train.base_models import build_model, cache_key, load_pretrained, weights_checksum
from calm_dist.train.beyond_paper import DIFFERENT_TOKENIZER, TWO_AUGMENTS, run_different_tokenizer, run_two_augments
from calm_dist.train.composition import Evaluator, build_composed, train_composition, train_on_composition_set
from calm_dist.train.evaluate import GenerateFn, calm_generate_fn, hf_generate_fn
from calm_dist.train.pretrain import init_seed, pretrain_on_split, pretrain_summary
from calm_dist.train.report import HELDIN_COLUMN, ROW_LABELS, MetricsLogger, loss_curve
from calm_dist.train.task_data import ANCHOR_TRAIN, EVAL_HELDIN, EVAL_SETS, TaskData

LORA, RANDOM_AUGMENT, VANILLA_AUGMENT = "lora", "calm_random_augment", "calm_vanilla_augment"
FLAGS = {LORA: "lora", RANDOM_AUGMENT: "random_augment", VANILLA_AUGMENT: "vanilla_augment",
         TWO_AUGMENTS: "two_augments", DIFFERENT_TOKENIZER: "different_tokenizer"}  # row -> baselines.*
LORA_PARAMETER_TOLERANCE = 0.05  # largest relative gap between LoRA's and the composition's trainable parameters
EVALUATED = {**EVAL_SETS, HELDIN_COLUMN: EVAL_HELDIN}  # task key -> evaluation split


def enabled_rows(config: Config) -> list[str]:
    return [row for row, flag in FLAGS.items() if getattr(config.baselines, flag)]


def metrics_filename(row: str) -> str:
    return f"metrics_{row}.jsonl"


def baseline_curves(config: Config, run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Each enabled baseline's training loss, titled like its row of the table."""
    return {ROW_LABELS[row]: loss_curve(run_dir, metrics_filename(row)) for row in enabled_rows(config)}


def count_trainable(parameters) -> int:
    return sum(p.numel() for p in parameters if p.requires_grad)


def _lora_model(anchor, rank: int, baselines: BaselinesConfig):
    from peft import LoraConfig, get_peft_model

    settings = LoraConfig(r=rank, lora_alpha=baselines.lora_alpha_per_rank * rank, lora_dropout=0.0, bias="none",
                          target_modules=baselines.lora_target_modules or "all-linear", task_type="CAUSAL_LM")
    return get_peft_model(anchor, settings)


def build_lora(anchor, composition_parameters: int, config: Config) -> tuple[torch.nn.Module, dict]:
    """LoRA on ``anchor`` (modified in place) at the rank whose trainable-parameter count is closest to
    the composition's (LoRA's count is linear in the rank), and what was chosen."""
    baselines = config.baselines
    per_rank = count_trainable(_lora_model(copy.deepcopy(anchor), 1, baselines).parameters())
    rank = max(1, round(composition_parameters / per_rank))
    torch.manual_seed(config.run.seed + 4)
    model = _lora_model(anchor, rank, baselines)
    parameters = count_trainable(model.parameters())
    gap = abs(parameters - composition_parameters) / composition_parameters
    if gap > LORA_PARAMETER_TOLERANCE:
        raise ValueError(
            f"baselines.lora_target_modules: LoRA on {baselines.lora_target_modules or 'every linear layer'} has "
            f"{per_rank} trainable parameters per rank, so no rank comes within {LORA_PARAMETER_TOLERANCE:.0%} of "
            f"the composition's {composition_parameters} (rank {rank}: {parameters}); target other modules"
        )
    modules = sorted({name.rsplit(".", 1)[-1] for name in model.base_model.targeted_module_names})
    return model, {"trainable_parameters": parameters, "composition_parameters": composition_parameters,
                   "relative_gap": round(gap, 4), "rank": rank, "lora_alpha": baselines.lora_alpha_per_rank * rank,
                   "target_modules": modules, "adapted_layers": len(model.base_model.targeted_module_names)}


def untrained_augment(config: Config, task_data: TaskData):
    """m_A before its pretraining: its architecture and the initial weights its pretraining starts from."""
    return build_model(config.augment.model, task_data.vocab_size, task_data.special_ids,
                       init_seed(config, "augment")).eval()


def vanilla_augment_dir(config: Config, task_data: TaskData) -> Path:
    """The vanilla m_A's cache entry: its own name, so it never collides with m_A's or m_B's."""
    key = cache_key(config.augment, task_data.split_fingerprint(ANCHOR_TRAIN), config.run.seed)
    return Path(config.run.cache_dir) / "models" / f"vanilla_augment-{key}"


def ensure_vanilla_augment(config: Config, task_data: TaskData) -> Path:
    target = vanilla_augment_dir(config, task_data)
    if not (target / "config.json").is_file():
        pretrain_on_split(config, "augment", ANCHOR_TRAIN, task_data, target)
    return target


def _train_logged(run_dir: Path, row: str, train: Callable[[MetricsLogger], object]) -> None:
    """Runs ``train`` with the row's own metrics file and TensorBoard directory."""
    filename = metrics_filename(row)
    (run_dir / filename).unlink(missing_ok=True)  # baselines never resume: a rerun logs afresh
    logger = MetricsLogger(run_dir, filename, tensorboard_dir=f"tensorboard/{row}")
    try:
        train(logger)
    finally:
        logger.close()


def _evaluate(evaluator: Evaluator, generate: GenerateFn, row: str) -> dict[str, float]:
    return {task: evaluator.accuracy(generate, split, row) for task, split in EVALUATED.items()}


def run_lora(config: Config, task_data: TaskData, model_dirs: dict[str, Path], evaluator: Evaluator,
             run_dir: Path, composition_parameters: int) -> tuple[dict, dict]:
    model, details = build_lora(load_pretrained(model_dirs["anchor"], "anchor"), composition_parameters, config)

    def loss_fn(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return causal_lm_loss(logits, batch["labels"], batch["attention_mask"])

    # The anchor stays in eval mode (no dropout) as it does inside CALM; LoRA itself has no dropout.
    trainable = [p for p in model.parameters() if p.requires_grad]
    _train_logged(run_dir, LORA, lambda logger: train_on_composition_set(
        loss_fn, trainable, config, task_data, logger, description=ROW_LABELS[LORA]))
    return _evaluate(evaluator, hf_generate_fn(model, evaluator.pad, evaluator.eos), LORA), details


def run_calm_variant(config: Config, task_data: TaskData, model_dirs: dict[str, Path], evaluator: Evaluator,
                     run_dir: Path, row: str, augment) -> tuple[dict, dict]:
    """CALM over the job's m_B and ``augment``, trained and evaluated like the job's CALM."""
    model = build_composed(config, model_dirs, task_data, augment=augment)
    _train_logged(run_dir, row, lambda logger: train_composition(model, config, task_data, logger,
                                                                 description=ROW_LABELS[row]))
    details = {"trainable_parameters": count_trainable(model.trainable_parameters())}
    return _evaluate(evaluator, calm_generate_fn(model, evaluator.pad, evaluator.eos), row), details


def _run_random_augment(config, task_data, model_dirs, evaluator, run_dir) -> tuple[dict, dict]:
    results, details = run_calm_variant(config, task_data, model_dirs, evaluator, run_dir, RANDOM_AUGMENT,
                                        untrained_augment(config, task_data))
    return results, {**details, "augment": {"untrained": True, "seed": init_seed(config, "augment")}}


def _run_vanilla_augment(config, task_data, model_dirs, evaluator, run_dir) -> tuple[dict, dict]:
    path = ensure_vanilla_augment(config, task_data)
    results, details = run_calm_variant(config, task_data, model_dirs, evaluator, run_dir, VANILLA_AUGMENT,
                                        load_pretrained(path, "vanilla augment"))
    augment = {"path": str(path), "trained_on": ANCHOR_TRAIN, "sha256": weights_checksum(path),
               **pretrain_summary(path)}
    return results, {**details, "augment": augment}


def run_baselines(config: Config, task_data: TaskData, model_dirs: dict[str, Path], evaluator: Evaluator,
                  run_dir: Path, *, composition_parameters: int, timer=None,
                  details: dict | None = None) -> dict[str, dict[str, float]]:
    """The enabled baselines' rows: {row: {task: accuracy %}}. ``details`` (when given) receives each row's
    trainable parameters and settings; ``timer`` (a job.Timer) marks each row as a phase."""
    row_tools = (lambda row, train: _train_logged(run_dir, row, train),
                 lambda generate, row: _evaluate(evaluator, generate, row))
    runners = {
        LORA: lambda: run_lora(config, task_data, model_dirs, evaluator, run_dir, composition_parameters),
        RANDOM_AUGMENT: lambda: _run_random_augment(config, task_data, model_dirs, evaluator, run_dir),
        VANILLA_AUGMENT: lambda: _run_vanilla_augment(config, task_data, model_dirs, evaluator, run_dir),
        TWO_AUGMENTS: lambda: run_two_augments(config, task_data, model_dirs, evaluator, *row_tools),
        DIFFERENT_TOKENIZER: lambda: run_different_tokenizer(config, task_data, model_dirs, evaluator, *row_tools),
    }
    results = {}
    for row in enabled_rows(config):
        results[row], row_details = runners[row]()
        if details is not None:
            details[row] = row_details
        if timer is not None:
            timer.mark(f"baseline_{row}")
    return results
