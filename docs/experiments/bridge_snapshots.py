"""``python -m launcher.train`` in one process (``run.launcher: local``) that also saves the bridges every 500
steps over the last 3,000 and, at the end, their exponential moving averages (decay 0.999 and 0.9995), for
``average_exports.py`` (investigation rows 75, 76).

    PYTHONPATH=. python docs/experiments/bridge_snapshots.py SNAPSHOT_DIR --config CONFIG [--set KEY=VALUE ...]
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import calm_dist.train.local as local
from calm_dist.reports import StepReport
from launcher.train import main

EVERY, SPAN, DECAYS = 500, 3000, (0.999, 0.9995)
original = local.train_in_process


def contiguous(state: dict) -> dict:
    return {key: value.contiguous() for key, value in state.items()}


def with_snapshots(directory: Path):
    """``train_in_process`` that also writes the snapshots into ``directory``."""
    def train_in_process(model, data, settings, on_report, **kwargs):
        return original(model, data, settings, snapshotting(model, settings.train.max_steps, on_report), **kwargs)

    def snapshotting(model, last: int, on_report):
        directory.mkdir(parents=True, exist_ok=True)
        averages: dict = {}

        def report(item) -> None:
            on_report(item)
            if not isinstance(item, StepReport):
                return
            state = {key: value.detach() for key, value in model.composition_state_dict().items()}
            for decay in DECAYS:
                average = averages.setdefault(decay, {key: value.double() for key, value in state.items()})
                for key, value in state.items():
                    average[key].lerp_(value.double(), 1 - decay)
            if item.step >= last - SPAN and item.step % EVERY == 0:
                save_file(contiguous(state), str(directory / f"step_{item.step:06d}.safetensors"))
            if item.step == last:
                for decay, average in averages.items():
                    save_file(contiguous({key: value.to(torch.float32) for key, value in average.items()}),
                              str(directory / f"ema_{decay}.safetensors"))

        return report

    return train_in_process


if __name__ == "__main__":  # the recipe's pretraining workers import this module again
    local.train_in_process = with_snapshots(Path(sys.argv[1]))
    sys.exit(main(sys.argv[2:] + ["--set", "run.launcher=local"]))
