"""The composition's learning-rate schedule: linear warm-up, then a cosine down to ``train.min_lr_rate``."""
import math

import pytest
import torch

from calm_dist.config import load_config
from calm_dist.optim import OptimSettings, make_optimizer, warmup_cosine


def lr_curve(overrides: list[str]) -> list[float]:
    train = load_config(None, overrides).train
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer, schedule = make_optimizer([parameter], OptimSettings.of(train))
    rates = []
    for _ in range(train.max_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


@pytest.mark.parametrize("floor", [0.0, 0.1, 0.5])
def test_the_cosine_runs_from_lr_after_warm_up_down_to_min_lr_rate(floor):
    rates = lr_curve(["train.max_steps=104", "train.lr=2e-3", "train.warmup_steps=4", f"train.min_lr_rate={floor}"])
    assert rates[:4] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3])
    assert rates[4] == pytest.approx(2e-3)
    assert rates[54] == pytest.approx(2e-3 * (floor + (1 - floor) * 0.5))  # half-way down the cosine
    assert rates[-1] == pytest.approx(2e-3 * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 99 / 100))))
    assert all(later <= earlier for earlier, later in zip(rates[4:], rates[5:]))
    after_the_end = OptimSettings(steps=104, lr=2e-3, warmup_steps=4, min_lr_rate=floor)
    assert warmup_cosine(10_000, after_the_end) == pytest.approx(floor)


def test_the_default_floor_is_a_tenth_of_lr():
    assert load_config(None, []).train.min_lr_rate == 0.1
    assert OptimSettings.of(load_config(None, []).train).min_lr_rate == 0.1


def test_a_section_without_min_lr_rate_keeps_the_default_floor():
    class Pretrain:  # a recipe's pretraining section: steps, lr, warm-up, decay, clipping only
        steps, lr, warmup_steps, weight_decay, grad_clip = 10, 1e-3, 0, 0.0, 1.0

    assert OptimSettings.of(Pretrain()).min_lr_rate == 0.1
