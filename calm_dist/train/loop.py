"""The optimisation loop shared by base-model pretraining and composition training."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm


@dataclass
class OptimSettings:
    steps: int
    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    @classmethod
    def of(cls, config, steps: int | None = None) -> "OptimSettings":
        """From an OptimConfig or TrainConfig."""
        total = steps if steps is not None else getattr(config, "steps", None) or config.max_steps
        return cls(total, config.lr, config.warmup_steps, config.weight_decay, config.grad_clip)


def warmup_cosine(step: int, settings: OptimSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(parameters: list[torch.nn.Parameter], settings: OptimSettings):
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, settings))
    return optimizer, schedule


def train_loop(
    loss_fn: Callable[[dict], torch.Tensor],
    parameters: list[torch.nn.Parameter],
    batches: Iterable[dict],
    settings: OptimSettings,
    *,
    description: str,
    on_step: Callable[[int, float, float], None] | None = None,
    start_step: int = 0,
    optimizer_state: tuple | None = None,
    show_progress: bool = True,
) -> list[float]:
    """Runs ``settings.steps - start_step`` optimizer steps; ``on_step(step, loss, lr)`` after each."""
    optimizer, schedule = optimizer_state or make_optimizer(parameters, settings)
    losses: list[float] = []
    iterator: Iterator[dict] = iter(batches)
    bar = tqdm(range(start_step, settings.steps), desc=description, disable=not show_progress,
               initial=start_step, total=settings.steps, dynamic_ncols=True)
    for step in bar:
        loss = loss_fn(next(iterator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
        optimizer.step()
        lr = schedule.get_last_lr()[0]
        schedule.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{description}: loss became {value} at step {step + 1}")
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
        if on_step is not None:
            on_step(step + 1, value, lr)
    bar.close()
    return losses
