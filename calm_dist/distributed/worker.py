"""One rank of a distributed composition run: plan roles, join the groups, run the role's loop.

The same code runs under torchrun (``launcher.train``) and inside Ray actors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from calm_dist.checkpoint import ResumePoint
from calm_dist.config import Config
from calm_dist.distributed.groups import Groups, init_groups
from calm_dist.distributed.topology import ANCHOR, AugmentSpec, Topology, plan_models_topology
from calm_dist.distributed.transport import ActivationReceiver, ActivationSender, wire_dtype
from calm_dist.model.connections import resolve_connections
from calm_dist.model.layers import ModelShape, find_decoder_layers
from calm_dist.train.task_data import TaskData


@dataclass
class RunInputs:
    """What every rank needs, prepared once before the workers start."""

    config: Config
    task_data: TaskData
    model_dirs: dict[str, Path]
    run_dir: Path | None = None
    checkpoints: str | None = None  # checkpoint store (path or URI) when checkpoint.every_steps > 0
    checkpoint_meta: dict | None = None  # the run's identity, written into every checkpoint
    resume: ResumePoint | None = None

    @property
    def first_step(self) -> int:
        return self.resume.step if self.resume is not None else 0


def _shape(path: Path) -> tuple[ModelShape, list[int]]:
    """A model's shape and the parameter count of each decoder layer, without loading weights."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    layers = find_decoder_layers(model)
    text = model.config.get_text_config()
    shape = ModelShape(len(layers), text.hidden_size, text.num_attention_heads, text.vocab_size)
    return shape, [sum(p.numel() for p in layer.parameters()) for layer in layers]


def plan(inputs: RunInputs, world_size: int) -> tuple[Topology, list[list[tuple[int, int]]], list[ModelShape]]:
    """(topology, each augmenting model's connections, each augmenting model's shape)."""
    from calm_dist.train.augmenting_models import augmenting_models, dir_key

    anchor_shape, _ = _shape(inputs.model_dirs["anchor"])
    connections, shapes, specs = [], [], []
    for model in augmenting_models(inputs.config):
        shape, layer_sizes = _shape(inputs.model_dirs[dir_key(model.index)])
        pairs = resolve_connections(shape.num_layers, anchor_shape.num_layers, **model.connection_kwargs)
        connections.append(pairs)
        shapes.append(shape)
        specs.append(AugmentSpec(model.stages, tuple(layer_sizes), tuple(a for a, _ in pairs), model.stages_key))
    topology = plan_models_topology(world_size, inputs.config.parallel.anchor_ranks, specs)
    return topology, connections, shapes


def micro_batch_size(config: Config) -> int:
    ranks = config.parallel.anchor_ranks
    if config.train.batch_size % ranks:
        raise ValueError(f"train.batch_size={config.train.batch_size} must be divisible by "
                         f"parallel.anchor_ranks={ranks} (each anchor rank takes an equal micro-batch)")
    return config.train.batch_size // ranks


def _reader(inputs: RunInputs, anchor_index: int):
    """The D_C reader of one anchor rank's micro-batches, at the resume position if there is one."""
    from calm_dist.train.composition import composition_reader

    reader = composition_reader(inputs.config, inputs.task_data, rank=anchor_index,
                                world_size=inputs.config.parallel.anchor_ranks)
    if inputs.resume is not None:
        reader.load_state_dict(inputs.resume.reader)
    return reader


def _checkpointer(inputs: RunInputs, engine, model):
    """after_step for the anchor ranks: a sharded checkpoint every checkpoint.every_steps and at the end."""
    from calm_dist.checkpoint import CheckpointStore, save_checkpoint

    every, keep, last = inputs.config.checkpoint.every_steps, inputs.config.checkpoint.keep, inputs.config.train.max_steps
    if not every or inputs.checkpoints is None:
        return None
    store = CheckpointStore(inputs.checkpoints)
    meta = {**(inputs.checkpoint_meta or {}), "connections": [list(pair) for pair in model.connections],
            "bridge_sources": list(model.bridge_sources)}

    def after_step(step: int, reader_position: dict) -> str | None:
        if step % every and step != last:
            return None
        return save_checkpoint(engine, store, step, reader_position, meta, keep)

    return after_step


def run_augment_role(inputs: RunInputs, groups: Groups, steps: range) -> dict:
    from calm_dist.distributed.augment_pipeline import AugmentStage, run_stage, stage_records
    from calm_dist.train.augmenting_models import dir_key

    parallel, role = inputs.config.parallel, groups.role
    augment = AutoModelForCausalLM.from_pretrained(inputs.model_dirs[dir_key(role.model)]).to(groups.device)
    stage = AugmentStage(augment, groups.topology.pipeline_of(role).stage_layers[role.index], stage_records(groups))
    readers = [_reader(inputs, index) for index in range(groups.topology.anchor_ranks)]
    sender = ActivationSender(groups.transport, wire_dtype(parallel.wire_dtype), parallel.pipeline_depth)
    hidden_sender = ActivationSender(groups.transport, stage.dtype, parallel.pipeline_depth)
    receiver = ActivationReceiver(groups.transport, stage.dtype, groups.device)
    run_stage(stage, groups, readers, steps, sender, hidden_sender, receiver)
    return {"role": groups.role.name, "bytes_sent": sender.counters.bytes_sent}


def run_anchor_role(inputs: RunInputs, groups: Groups, connections, augment_shapes: list[ModelShape],
                    steps: range, on_step=None) -> dict:
    """``connections`` and ``augment_shapes``: one entry per augmenting model."""
    from calm_dist.distributed.anchor_worker import AnchorWorker
    from calm_dist.distributed.zero_anchor import build_engine, configure_anchor, deepspeed_config, load_partitioned
    from calm_dist.model.composed import CALMModel

    config = inputs.config
    micro = micro_batch_size(config)
    anchor = load_partitioned(inputs.model_dirs["anchor"], deepspeed_config(config, micro),
                              config.deepspeed.return_freed_memory)
    anchor = configure_anchor(anchor, config)
    torch.manual_seed(config.run.seed + 4)  # the same bridge initialisation as the single-process model
    model = CALMModel(anchor, None, connections, augment_shapes, config.composition.relative_scale)
    resume = inputs.resume
    engine, optimizer, _ = build_engine(model, config, micro, load_universal=resume is not None and resume.universal)
    if resume is not None:
        from calm_dist.checkpoint import load_checkpoint

        load_checkpoint(engine, resume, groups.role.index)
    receiver = ActivationReceiver(groups.transport, wire_dtype(config.parallel.wire_dtype), groups.device)
    worker = AnchorWorker(engine, groups, _reader(inputs, groups.role.index), receiver,
                          [shape.hidden_size for shape in augment_shapes], _checkpointer(inputs, engine, model))
    losses = worker.train(steps, on_step)
    return {"role": groups.role.name, "losses": losses, "engine": engine, "optimizer": optimizer, "model": model}


def run_worker(inputs: RunInputs, rank: int, world_size: int, store, on_step=None) -> dict:
    """Runs this rank's role. The anchor ranks' default group stays up (the caller may gather the bridges
    through it); the caller ends with ``groups.leave_process_groups()``."""
    topology, connections, augment_shapes = plan(inputs, world_size)
    parallel = inputs.config.parallel
    groups = init_groups(topology, rank, store, parallel.backend, parallel.timeout_s)
    steps = range(inputs.first_step, inputs.config.train.max_steps)
    if groups.role.kind == ANCHOR:
        from calm_dist.distributed.zero_anchor import init_deepspeed

        init_deepspeed(groups.backend)
        result = run_anchor_role(inputs, groups, connections, augment_shapes, steps, on_step)
    else:
        result = run_augment_role(inputs, groups, steps)
    groups.close_transport()  # the default group stays for the caller: see groups.leave_process_groups
    return result
