"""The composition in one process: the single-process twin of the distributed runtime.

It walks the same units (``data_pipeline.run_units``) over the same batches as the anchor ranks and
augment stages, with the same loss (summed token loss over the global batch's labelled tokens), the
same optimizer schedule and the same evaluations, and reports the same records.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

import data_pipeline as dp
from calm_dist.config import EvalConfig, TrainConfig
from calm_dist.optim import OptimSettings, make_optimizer
from calm_dist.reports import EvalReport, EvalTotals, StepReport
from calm_dist.train.evaluate import calm_statistics, totals_of

Report = Callable[[StepReport | EvalReport], None]


@dataclass(frozen=True)
class LoopSettings:
    train: TrainConfig
    eval: EvalConfig
    seed: int  # the order of the training rows
    # the model's frozen base models are bf16 (``deepspeed.bf16``): every forward runs under bf16 autocast, so
    # the bridges compute in bf16 as on the anchor ranks while their weights and optimizer state stay fp32
    bf16: bool = False


def in_precision(statistics, bf16: bool, device_type: str):
    """``statistics`` run under bf16 autocast when ``bf16`` (the loss itself is computed in fp32)."""
    if not bf16:
        return statistics

    def autocast_statistics(batch):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return statistics(batch)

    return autocast_statistics


def train_in_process(model, data: dp.PreparedData, settings: LoopSettings, on_report: Report,
                     show_progress: bool = True) -> None:
    """Trains ``model``'s bridges from step 0 to ``train.max_steps``, evaluating as the schedule says."""
    from tqdm.auto import tqdm

    layout = dp.anchor_layout(data.augment_columns, data.pad_ids)  # with every augmenting model's own tokens
    reader = dp.ShardedReader(data.train, settings.train.batch_size, seed=settings.seed, pad_id=data.pad_id,
                              layout=layout)
    evaluations = {name: dp.EvalBatches(data.eval_dir(name), settings.eval.batch_size, pad_id=data.pad_id,
                                        layout=layout)
                   for name in data.eval_names}
    parameters = model.trainable_parameters()
    optimizer, schedule = make_optimizer(parameters, OptimSettings.of(settings.train))
    statistics = in_precision(calm_statistics(model, data.augment_columns), settings.bf16,
                               next(model.parameters()).device.type)
    totals = EvalTotals()
    bar = tqdm(total=settings.train.max_steps, desc="composition", disable=not show_progress, dynamic_ncols=True)
    units = dp.run_units(0, settings.train.max_steps, settings.eval.every_steps,
                         {name: len(batches) for name, batches in evaluations.items()})
    evaluation_started = time.perf_counter()
    for unit in units:
        if unit.kind == dp.TRAIN:
            started = time.perf_counter()
            model.train()
            batch_statistics = statistics(next(reader))
            optimizer.zero_grad(set_to_none=True)
            batch_statistics.mean_loss.backward()
            if settings.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(parameters, settings.train.grad_clip)
            optimizer.step()
            lr = schedule.get_last_lr()[0]
            schedule.step()
            loss = float(batch_statistics.mean_loss.detach())
            if not math.isfinite(loss):
                raise FloatingPointError(f"composition: loss became {loss} at step {unit.step}")
            on_report(StepReport(unit.step, loss, lr, batch_statistics.tokens, time.perf_counter() - started,
                                 finished_at=time.time()))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            evaluation_started = time.perf_counter()
            continue
        model.eval()
        with torch.no_grad():
            totals = totals.add(totals_of(statistics(evaluations[unit.eval_set].batch(unit.batch))))
        if unit.ends_eval:
            report = EvalReport(unit.step, unit.eval_set, totals, time.perf_counter() - evaluation_started)
            on_report(report)
            bar.write(f"eval at step {unit.step}: {unit.eval_set} loss {report.loss:.4f}, "
                      f"exact match {report.exact_match:.1f}%")
            totals, evaluation_started = EvalTotals(), time.perf_counter()
    bar.close()
    model.eval()
