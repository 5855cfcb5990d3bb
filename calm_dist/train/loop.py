"""A plain optimisation loop over batches (a recipe's base-model pretraining uses it; the composition
itself runs in ``local.py`` so that it walks the same units as the distributed runtime)."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from calm_dist.optim import OptimSettings, make_optimizer, warmup_cosine  # noqa: F401  (re-exported)


def train_loop(
    loss_fn: Callable[[dict], torch.Tensor],
    parameters: list[torch.nn.Parameter],
    batches: Iterable[dict],
    settings: OptimSettings,
    *,
    description: str,
    on_step: Callable[[int, float, float], None] | None = None,
    show_progress: bool = True,
) -> list[float]:
    """Runs ``settings.steps`` optimizer steps; ``on_step(step, loss, lr)`` after each."""
    optimizer, schedule = make_optimizer(parameters, settings)
    losses: list[float] = []
    iterator: Iterator[dict] = iter(batches)
    bar = tqdm(range(settings.steps), desc=description, disable=not show_progress, dynamic_ncols=True)
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
