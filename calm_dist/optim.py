"""The composition's optimizer schedule, shared by the single-process loop and the ZeRO-3 engine."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from calm_dist.config import TrainConfig


@dataclass(frozen=True)
class OptimSettings:
    steps: int
    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    min_lr_rate: float = TrainConfig.min_lr_rate

    @classmethod
    def of(cls, train) -> "OptimSettings":
        """From a ``TrainConfig`` (``max_steps``) or any section with ``steps`` (a section without
        ``min_lr_rate`` keeps the default floor)."""
        steps = getattr(train, "max_steps", None) or train.steps
        return cls(steps, train.lr, train.warmup_steps, train.weight_decay, train.grad_clip,
                   getattr(train, "min_lr_rate", cls.min_lr_rate))


def warmup_cosine(step: int, settings: OptimSettings) -> float:
    """Learning-rate factor: linear warm-up, then cosine down to ``min_lr_rate``."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    floor = settings.min_lr_rate
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(parameters: list[torch.nn.Parameter], settings: OptimSettings):
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, settings))
    return optimizer, schedule
