"""Exports of a finished run whose bridges are the mean of its last K snapshots, or an exponential moving
average of them, from ``bridge_snapshots.py``'s directory (investigation rows 75, 76); evaluate each with
``kv_errors.py``.

    PYTHONPATH=. python docs/experiments/average_exports.py RUN_DIR/export SNAPSHOT_DIR OUT_DIR K [K ...]
"""
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "composition.safetensors"

export, snapshots, out_dir, sizes = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), map(int, sys.argv[4:])


def write(name: str, state: dict) -> None:
    target = out_dir / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(export, target)
    save_file(state, str(target / WEIGHTS))
    print(target)


steps = sorted(snapshots.glob("step_*.safetensors"))
for k in sizes:
    states = [load_file(str(path)) for path in steps[-k:]]
    write(f"mean_of_last_{k}", {key: torch.stack([state[key].double() for state in states]).mean(0).float()
                                for key in states[-1]})
for path in sorted(snapshots.glob("ema_*.safetensors")):
    write(path.stem, load_file(str(path)))
