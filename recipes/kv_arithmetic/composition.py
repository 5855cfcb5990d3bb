"""Composition training (single process) and evaluation of m_A, m_B and CALM."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

import data_pipeline as dp
from calm_dist.config import Config
from calm_dist.model.composed import CALMModel, compose
from calm_dist.train.base_models import load_pretrained
from calm_dist.train.evaluate import calm_generate_fn, exact_match, hf_generate_fn
from calm_dist.train.loop import OptimSettings, train_loop
from calm_dist.train.report import MetricsLogger
from calm_dist.train.task_data import COMPOSITION_TRAIN, EVAL_HELDIN, EVAL_SETS, EVAL_VAL, TaskData, eval_rows


def connection_kwargs(config: Config) -> dict:
    composition = config.composition
    if composition.connections is not None:
        return {"connections": [tuple(pair) for pair in composition.connections]}
    return {"every_n": composition.every_n}  # None: resolve_connections' default (every 4th layer)


def compose_kwargs(config: Config) -> dict:
    return {**connection_kwargs(config), "relative_scale": config.composition.relative_scale}


def _check_vocabulary(model, side: str, task_data: TaskData) -> None:
    size = model.config.get_text_config().vocab_size
    if size != task_data.vocab_size:
        raise ValueError(
            f"{side}.model.path: the model has a vocabulary of {size} tokens but the task tokenizer "
            f"({task_data.tokenizer_dir}) has {task_data.vocab_size}; use a model trained with that tokenizer"
        )


def build_composed(config: Config, model_dirs: dict[str, Path], task_data: TaskData, augment=None) -> CALMModel:
    """CALM over the saved base models; ``augment`` replaces the saved m_A (the baselines' ablations)."""
    anchor = load_pretrained(model_dirs["anchor"], "anchor")
    augment = augment if augment is not None else load_pretrained(model_dirs["augment"], "augment")
    _check_vocabulary(anchor, "anchor", task_data)
    _check_vocabulary(augment, "augment", task_data)
    torch.manual_seed(config.run.seed + 4)
    return compose(anchor, augment, **compose_kwargs(config))


def composition_reader(config: Config, task_data: TaskData, rank: int = 0, world_size: int = 1):
    """D_C batches of one anchor rank: its 1/world_size share of each global batch of train.batch_size."""
    return dp.ShardedReader(task_data.directory, COMPOSITION_TRAIN, config.train.batch_size // world_size, rank=rank,
                            world_size=world_size, seed=config.run.seed + 3,
                            pad_id=task_data.special_ids["pad_token_id"])


class Evaluator:
    """Exact-match accuracy of any model on the job's evaluation splits."""

    def __init__(self, config: Config, task_data: TaskData, show_progress: bool = True):
        self.config, self.task_data, self.show_progress = config, task_data, show_progress
        self.pad, self.eos = task_data.special_ids["pad_token_id"], task_data.special_ids["eos_token_id"]
        self._rows: dict[str, tuple] = {}

    def accuracy(self, generate, split: str, label: str) -> float:
        if split not in self._rows:
            self._rows[split] = eval_rows(self.task_data, split)
        prompts, answers = self._rows[split]
        return exact_match(generate, prompts, answers, pad_id=self.pad, eos_id=self.eos,
                           batch_size=self.config.eval.batch_size, max_new_tokens=self.config.eval.max_new_tokens,
                           description=f"eval {label} {split}", show_progress=self.show_progress)

    def table(self, model: CALMModel) -> dict:
        generators = {
            "m_A": hf_generate_fn(model.augment, self.pad, self.eos),
            "m_B": hf_generate_fn(model.anchor, self.pad, self.eos),
            "calm": calm_generate_fn(model, self.pad, self.eos),
        }
        results = {row: {task: self.accuracy(fn, split, row) for task, split in EVAL_SETS.items()}
                   for row, fn in generators.items()}
        results["calm_heldin_keys"] = {"kv_arithmetic": self.accuracy(generators["calm"], EVAL_HELDIN, "calm")}
        return results

    def has_validation(self) -> bool:
        return EVAL_VAL in self.task_data.manifest["splits"]

    def tracking(self, model: CALMModel) -> dict:
        """KV-Arithmetic accuracies logged during training. Only the validation keys (or, without
        them, held-in keys) may choose anything; held-out keys are logged to watch, never to select."""
        generate = calm_generate_fn(model, self.pad, self.eos)
        split = EVAL_VAL if self.has_validation() else EVAL_HELDIN
        return {
            "val_kv_arithmetic" if self.has_validation() else "heldin_kv_arithmetic": self.accuracy(generate, split, "calm"),
            "heldout_kv_arithmetic": self.accuracy(generate, EVAL_SETS["kv_arithmetic"], "calm"),
            "numeric_arithmetic": self.accuracy(generate, EVAL_SETS["numeric_arithmetic"], "calm"),
        }


def train_on_composition_set(loss_fn: Callable[[dict], torch.Tensor], parameters: list[torch.nn.Parameter],
                             config: Config, task_data: TaskData, logger: MetricsLogger, *, description: str,
                             track: Callable[[int], dict] | None = None) -> list[tuple[int, float]]:
    """Trains ``parameters`` on D_C with the composition's budget (train.*); logs one record per optimizer
    step, with ``track(step)``'s entries added. Returns the (step, loss) curve."""
    reader = composition_reader(config, task_data)
    tokens_per_step = [0]
    curve: list[tuple[int, float]] = []
    started = time.perf_counter()

    def counted_loss(batch):
        tokens_per_step[0] = int(batch["attention_mask"].sum())
        return loss_fn(batch)

    def on_step(step: int, loss: float, lr: float) -> None:
        record = {"step": step, "loss": loss, "lr": lr, "tokens": tokens_per_step[0],
                  "elapsed_s": round(time.perf_counter() - started, 3)}
        if track is not None:
            record.update(track(step))
        logger.log(record)
        curve.append((step, loss))

    train_loop(counted_loss, parameters, reader, OptimSettings.of(config.train), description=description,
               on_step=on_step)
    return curve


def train_composition(model: CALMModel, config: Config, task_data: TaskData, logger: MetricsLogger,
                      evaluator: Evaluator | None = None,
                      description: str = "composition (CALM)") -> list[tuple[int, float]]:
    """Trains the bridges on D_C; logs one record per optimizer step."""

    def track(step: int) -> dict:
        every = config.train.eval_every
        if evaluator is None or not every or step % every or step >= config.train.max_steps:
            return {}
        model.eval()
        accuracies = evaluator.tracking(model)
        model.train()
        return accuracies

    def loss_fn(batch):
        return model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    model.train()
    curve = train_on_composition_set(loss_fn, model.trainable_parameters(), config, task_data, logger,
                                     description=description, track=track)
    model.eval()
    return curve
