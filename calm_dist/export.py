"""Exported compositions: consolidated composition weights + the base models they belong to.

An export directory holds ``composition.safetensors`` (fp32 bridge weights), ``calm_export.json``
(connections, the augmenting model of each bridge, relative_scale, the step, each base model's path
and sha256) and ``config.yaml``.
``load_exported`` rebuilds the composed model in one process for evaluation and generation.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from calm_dist.model.composed import CALMModel, compose

WEIGHTS, INFO = "composition.safetensors", "calm_export.json"


def write_export(target: Path, weights: dict[str, torch.Tensor], info: dict, config_yaml: str) -> Path:
    """Writes the export atomically: a temporary sibling directory, renamed into place."""
    from safetensors.torch import save_file

    target = Path(target)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file({key: value.contiguous() for key, value in weights.items()}, str(temporary / WEIGHTS))
    (temporary / INFO).write_text(json.dumps(info, indent=1))
    (temporary / "config.yaml").write_text(config_yaml)
    if target.exists():
        shutil.rmtree(target)
    os.replace(temporary, target)
    return target


def load_exported(path: str | os.PathLike, anchor_path: str | None = None, augment_path: str | None = None,
                  verify: bool = True) -> CALMModel:
    """The composed model of an export; the base models come from the recorded paths unless given.
    With ``verify`` their weights must match the recorded sha256 (ValueError otherwise)."""
    from calm_dist.identity import weights_checksum
    from calm_dist.train.models import load_causal_lm

    path = Path(path)
    if not (path / INFO).is_file():
        raise FileNotFoundError(f"{path} is not a calm_dist export (no {INFO}); write one with python -m launcher.export")
    info = json.loads((path / INFO).read_text())
    chosen = {"anchor": anchor_path, "augment": augment_path}
    models = {}
    for side, recorded in info["base_models"].items():
        model_dir = Path(chosen.get(side) or recorded["path"])
        if verify and weights_checksum(model_dir) != recorded["sha256"]:
            raise ValueError(f"the {side} model at {model_dir} is not the one this composition was trained with "
                             f"(sha256 {recorded['sha256'][:12]}…); pass the original weights")
        models[side] = load_causal_lm(model_dir, side)
    model = _composed(models, info)
    from safetensors.torch import load_file

    model.load_composition_state_dict(load_file(str(path / WEIGHTS)))
    return model.eval()


def _composed(models: dict, info: dict) -> CALMModel:
    """The export's composition over its base models: one augmenting model, or several (``bridge_sources``
    names each bridge's model, model ``m`` being ``models[dir_key(m)]``)."""
    def dir_key(model: int) -> str:
        return "augment" if model == 0 else f"augment_{model}"

    pairs = [tuple(pair) for pair in info["connections"]]
    sources = info.get("bridge_sources") or [0] * len(pairs)
    if max(sources) == 0:
        return compose(models["anchor"], models["augment"], connections=pairs, relative_scale=info["relative_scale"])
    count = max(sources) + 1
    per_model = [[pair for pair, source in zip(pairs, sources) if source == model] for model in range(count)]
    return compose(models["anchor"], [models[dir_key(model)] for model in range(count)], connections=per_model,
                   relative_scale=info["relative_scale"])
