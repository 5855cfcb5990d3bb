"""A second augmenting model for the multi-augment tests, and their single-process reference run."""
from __future__ import annotations

from pathlib import Path

import torch

from calm_dist.config import ModelConfig, load_config
from calm_dist.train.augmenting_models import build_multi_composed
from calm_dist.train.base_models import build_model
from calm_dist.train.composition import composition_reader
from calm_dist.train.loop import OptimSettings, train_loop
from calm_dist.train.pretrain import ensure_base_models
from calm_dist.train.task_data import prepare_task_data

# Another architecture and width than tiny.yaml's llama m_A; its last layer (2) is tapped after the final norm.
EXTRA_MODEL = ModelConfig(arch="gpt2", hidden_size=24, num_layers=3, num_heads=2, intermediate_size=48)
EXTRA_CONNECTIONS = [[2, 0], [0, -1], [1, 1]]


def save_extra_augment(task_data, target: Path, seed: int = 11) -> Path:
    """A randomly initialised model over the task's vocabulary, saved with save_pretrained."""
    build_model(EXTRA_MODEL, task_data.vocab_size, task_data.special_ids, seed).save_pretrained(target)
    return target


def prepare_two_augments(root: Path, steps: int, extra_stages: int = 1, overrides: tuple = ()):
    """tiny.yaml with one extra augmenting model: (config, task data, model dirs of all three models)."""
    from calm_dist.train.augmenting_models import extra_augment_dirs

    base = [f"run.cache_dir={root / 'cache'}", f"train.max_steps={steps}", "train.batch_size=8",
            "composition.connections=[[0, -1], [1, 0], [1, 1]]", "parallel.timeout_s=60", *overrides]
    task_data = prepare_task_data(load_config("configs/tiny.yaml", base))
    extra_dir = save_extra_augment(task_data, root / "extra_augment")
    extra = f"extra_augments=[{{path: {extra_dir}, connections: {EXTRA_CONNECTIONS}, stages: {extra_stages}}}]"
    config = load_config("configs/tiny.yaml", [*base, extra])
    model_dirs = {**ensure_base_models(config, task_data), **extra_augment_dirs(config)}
    return config, task_data, model_dirs


def single_process_multi(config, task_data, model_dirs) -> tuple[list[float], dict]:
    """compose(anchor, [augment, extra]) trained in one process: per-step losses and final bridges."""
    torch.set_num_threads(1)
    model = build_multi_composed(config, model_dirs).train()
    reader = composition_reader(config, task_data)
    loss_fn = lambda b: model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss  # noqa
    losses = train_loop(loss_fn, model.trainable_parameters(), reader, OptimSettings.of(config.train),
                        description="reference", show_progress=False)
    return losses, model.composition_state_dict()
