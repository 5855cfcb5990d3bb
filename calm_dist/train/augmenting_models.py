"""The augmenting models of a run: the ``augment`` section's (model 0) and each ``extra_augments`` entry.

Model ``m``'s directory is ``model_dirs[dir_key(m)]`` ("augment", then "augment_1", "augment_2", ...);
its bridges come after those of models ``0..m-1`` in the composed model's flat bridge order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from calm_dist.config import Config


@dataclass(frozen=True)
class AugmentingModel:
    index: int
    stages: int
    stages_key: str  # the config key of its stage count, for error messages
    connection_kwargs: dict  # resolve_connections' every_n / connections


def dir_key(model: int) -> str:
    return "augment" if model == 0 else f"augment_{model}"


def augmenting_models(config: Config) -> list[AugmentingModel]:
    from calm_dist.train.composition import connection_kwargs

    models = [AugmentingModel(0, config.parallel.augment_stages, "parallel.augment_stages", connection_kwargs(config))]
    for index, extra in enumerate(config.extra_augments):
        pairs = {"connections": [tuple(p) for p in extra.connections]} if extra.connections is not None else {}
        models.append(AugmentingModel(index + 1, extra.stages, f"extra_augments[{index}].stages", pairs))
    return models


def planned_world_size(config: Config) -> int:
    """Ranks of the distributed plan: the anchor ranks plus every augmenting model's stages."""
    return config.parallel.anchor_ranks + sum(model.stages for model in augmenting_models(config))


def extra_augment_dirs(config: Config) -> dict[str, Path]:
    """The extra augmenting models' directories by model-dirs key; ValueError naming the key when a
    path holds no saved model."""
    dirs = {}
    for index, extra in enumerate(config.extra_augments):
        path = Path(extra.path)
        if not (path / "config.json").is_file():
            raise ValueError(f"config key 'extra_augments[{index}].path': {str(path)!r} holds no saved Hugging Face "
                             "model (no config.json); give a directory written by save_pretrained")
        dirs[dir_key(index + 1)] = path
    return dirs


def check_extra_vocabularies(config: Config, task_data) -> None:
    """Every extra augmenting model must read the task tokenizer's ids, as the anchor does."""
    from transformers import AutoConfig

    for index, extra in enumerate(config.extra_augments):
        size = AutoConfig.from_pretrained(extra.path).get_text_config().vocab_size
        if size != task_data.vocab_size:
            raise ValueError(f"config key 'extra_augments[{index}].path': the model has a vocabulary of {size} "
                             f"tokens but the task tokenizer ({task_data.tokenizer_dir}) has {task_data.vocab_size}; "
                             "use a model trained with that tokenizer")


def build_multi_composed(config: Config, model_dirs: dict[str, Path]):
    """The single-process composed model over the anchor and every augmenting model (flat bridge order)."""
    import torch

    from calm_dist.model.composed import compose
    from calm_dist.model.connections import resolve_connections
    from calm_dist.model.layers import model_shape
    from calm_dist.train.base_models import load_pretrained

    anchor = load_pretrained(model_dirs["anchor"], "anchor")
    augments, connections = [], []
    for model in augmenting_models(config):
        augment = load_pretrained(model_dirs[dir_key(model.index)], dir_key(model.index))
        augments.append(augment)
        connections.append(resolve_connections(model_shape(augment).num_layers, model_shape(anchor).num_layers,
                                               **model.connection_kwargs))
    torch.manual_seed(config.run.seed + 4)
    return compose(anchor, augments, connections=connections, relative_scale=config.composition.relative_scale)
