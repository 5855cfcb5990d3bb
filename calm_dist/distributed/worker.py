"""One rank of a distributed composition run: plan roles, join the groups, run the role's loop.

The same code runs under torchrun and inside Ray actors (both started by ``launcher``). Every rank gets
the same ``RunInputs``, prepared once before any worker starts, and holds only the parts of the config
its loop needs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import data_pipeline as dp
from calm_dist.checkpoint import ResumePoint
from calm_dist.config import CheckpointConfig, DeepSpeedConfig, EvalConfig, ParallelConfig, TrainConfig
from calm_dist.distributed.groups import Groups, init_groups
from calm_dist.distributed.topology import ANCHOR, AugmentSpec, Topology, plan_models_topology
from calm_dist.distributed.transport import ActivationReceiver, ActivationSender, wire_dtype
from calm_dist.model.composed import CompositionSpec
from calm_dist.model.layers import ModelShape, saved_model_facts


@dataclass(frozen=True)
class RuntimeData:
    """The tokenised datasets every role reads (paths every node sees). An augmenting model with a tokenizer of
    its own reads its tokenisation of the same rows (``augment_columns``: per model its name, None = the
    anchor's tokens); the anchor ranks read every such tokenisation's offsets beside their own."""

    train: str
    evals: dict[str, str]  # evaluation set name -> tokenised directory, in evaluation order
    pad_id: int
    augment_columns: tuple[str | None, ...] = ()
    pad_ids: dict[str, int] = field(default_factory=dict)  # each augmenting tokenisation's pad id, by name

    def augment_column(self, model: int) -> str | None:
        return self.augment_columns[model] if self.augment_columns else None

    def anchor_layout(self) -> dp.BatchLayout:
        return dp.anchor_layout(self.augment_columns, self.pad_ids)

    def augment_layout(self, model: int) -> dp.BatchLayout:
        return dp.augment_layout(self.augment_column(model), self.pad_ids)


@dataclass(frozen=True)
class AugmentModelInputs:
    path: str
    stages: int
    stages_key: str  # the config key of ``stages``, for messages


@dataclass(frozen=True)
class RunInputs:
    """What every rank needs, prepared once before the workers start."""

    train: TrainConfig
    eval: EvalConfig
    parallel: ParallelConfig
    deepspeed: DeepSpeedConfig
    checkpoint: CheckpointConfig
    seed: int  # the order of the training rows
    anchor_path: str
    augments: tuple[AugmentModelInputs, ...]
    composition: CompositionSpec
    data: RuntimeData
    checkpoints: str | None = None  # checkpoint store (path or URI) when checkpoint.every_steps > 0
    checkpoint_meta: dict | None = field(default=None, compare=False)  # the run's identity, in every checkpoint
    resume: ResumePoint | None = None

    @property
    def first_step(self) -> int:
        return self.resume.step if self.resume is not None else 0

    @property
    def world_size(self) -> int:
        return self.parallel.anchor_ranks + sum(model.stages for model in self.augments)

    def with_anchor_ranks(self, anchor_ranks: int) -> "RunInputs":
        return dataclasses.replace(self, parallel=dataclasses.replace(self.parallel, anchor_ranks=anchor_ranks))


def plan(inputs: RunInputs, world_size: int | None = None) -> tuple[Topology, list[ModelShape]]:
    """(topology, each augmenting model's shape); ValueError naming the config key when the plan cannot work."""
    specs, shapes = [], []
    for model, pairs in zip(inputs.augments, inputs.composition.connections, strict=True):
        facts = saved_model_facts(model.path)
        shapes.append(facts.shape)
        specs.append(AugmentSpec(model.stages, facts.layer_sizes, tuple(a for a, _ in pairs), model.stages_key))
    topology = plan_models_topology(world_size or inputs.world_size, inputs.parallel.anchor_ranks, specs)
    return topology, shapes


def micro_batch_size(inputs: RunInputs) -> int:
    return inputs.train.batch_size // inputs.parallel.anchor_ranks


def train_reader(inputs: RunInputs, anchor_index: int, layout: dp.BatchLayout | None = None) -> dp.ShardedReader:
    """The training micro-batches of one anchor rank, at the resume position if there is one; ``layout``: the
    tokenisations they carry (default: the anchor's, with what its cross-attention masks need)."""
    reader = dp.ShardedReader(inputs.data.train, micro_batch_size(inputs), rank=anchor_index,
                              world_size=inputs.parallel.anchor_ranks, seed=inputs.seed, pad_id=inputs.data.pad_id,
                              layout=layout or inputs.data.anchor_layout())
    if inputs.resume is not None:
        reader.load_state_dict(inputs.resume.reader)
    return reader


def eval_batches(inputs: RunInputs, anchor_index: int, layout: dp.BatchLayout | None = None
                 ) -> dict[str, dp.EvalBatches]:
    return {name: dp.EvalBatches(path, inputs.eval.batch_size, rank=anchor_index,
                                 world_size=inputs.parallel.anchor_ranks, pad_id=inputs.data.pad_id,
                                 layout=layout or inputs.data.anchor_layout())
            for name, path in inputs.data.evals.items()}


def run_units(inputs: RunInputs, evaluations: dict[str, dp.EvalBatches]):
    return dp.run_units(inputs.first_step, inputs.train.max_steps, inputs.eval.every_steps,
                        {name: len(batches) for name, batches in evaluations.items()})


class BatchSource:
    """The batch of each unit for one anchor rank: the next training micro-batch, or an evaluation batch. Every
    role reads the same rows in the same order; ``layout`` says which tokenisations of them (an augment stage
    with its own tokenizer reads only its own)."""

    def __init__(self, inputs: RunInputs, anchor_index: int, layout: dp.BatchLayout | None = None):
        self.reader = train_reader(inputs, anchor_index, layout)
        self.evaluations = eval_batches(inputs, anchor_index, layout)

    def batch(self, unit: dp.Unit) -> tuple[dict, dict | None]:
        """(batch, the reader's position after it for a training unit, else None)."""
        if unit.kind == dp.TRAIN:
            return next(self.reader), self.reader.state_dict()
        return self.evaluations[unit.eval_set].batch(unit.batch), None


def _checkpointer(inputs: RunInputs, engine, model):
    """after_step for the anchor ranks: a sharded checkpoint every checkpoint.every_steps and at the end."""
    from calm_dist.checkpoint import CheckpointStore, save_checkpoint

    every, keep, last = inputs.checkpoint.every_steps, inputs.checkpoint.keep, inputs.train.max_steps
    if not every or inputs.checkpoints is None:
        return None
    store = CheckpointStore(inputs.checkpoints)
    meta = {**(inputs.checkpoint_meta or {}), "connections": [list(pair) for pair in model.connections],
            "bridge_sources": list(model.bridge_sources)}

    def after_step(step: int, reader_position: dict, records: list[dict]):
        import torch.distributed as dist

        from calm_dist.distributed.anchor_worker import CheckpointWrite

        if step % every and step != last:
            return None
        if dist.get_rank() == 0:
            store.write_records(step, records)
        return CheckpointWrite(save_checkpoint(engine, store, step, reader_position, meta, keep))

    return after_step


def run_augment_role(inputs: RunInputs, groups: Groups) -> dict:
    from transformers import AutoModelForCausalLM

    from calm_dist.distributed.augment_pipeline import AugmentStage, run_stage, stage_records

    parallel, role = inputs.parallel, groups.role
    # deepspeed.bf16: the augmenting models compute in bf16 like the anchor (and the single-process twin)
    augment = AutoModelForCausalLM.from_pretrained(inputs.augments[role.model].path,
                                                   dtype=inputs.deepspeed.base_model_dtype).to(groups.device)
    stage = AugmentStage(augment, groups.topology.pipeline_of(role).stage_layers[role.index], stage_records(groups))
    layout = inputs.data.augment_layout(role.model)
    sources = [BatchSource(inputs, index, layout) for index in range(groups.topology.anchor_ranks)]
    sender = ActivationSender(groups.transport, wire_dtype(parallel.wire_dtype), parallel.pipeline_depth)
    hidden_sender = ActivationSender(groups.transport, stage.dtype, parallel.pipeline_depth)
    receiver = ActivationReceiver(groups.transport, stage.dtype, groups.device)
    run_stage(stage, groups, sources, run_units(inputs, sources[0].evaluations), sender, hidden_sender, receiver,
              inputs.data.augment_column(role.model))
    return {"role": groups.role.name, "bytes_sent": sender.counters.bytes_sent}


def run_anchor_role(inputs: RunInputs, groups: Groups, augment_shapes: list[ModelShape], on_report=None) -> dict:
    from calm_dist.distributed.anchor_worker import AnchorWorker
    from calm_dist.distributed.zero_anchor import build_engine, configure_anchor, deepspeed_config, load_partitioned

    micro = micro_batch_size(inputs)
    anchor = load_partitioned(inputs.anchor_path, deepspeed_config(inputs.deepspeed, inputs.train, micro),
                              inputs.deepspeed.return_freed_memory, inputs.deepspeed.vocab_piece_rows)
    anchor = configure_anchor(anchor, inputs.deepspeed)
    model = inputs.composition.build(anchor, None, augment_shapes)
    if inputs.deepspeed.activation_checkpointing:
        model.checkpoint_activations()
    resume = inputs.resume
    engine, optimizer, _ = build_engine(model, inputs.deepspeed, inputs.train, micro,
                                        load_universal=resume is not None and resume.universal)
    if resume is not None:
        from calm_dist.checkpoint import load_checkpoint

        load_checkpoint(engine, resume, groups.role.index)
    receiver = ActivationReceiver(groups.transport, wire_dtype(inputs.parallel.wire_dtype), groups.device)
    source = BatchSource(inputs, groups.role.index)
    columns = tuple(inputs.data.augment_column(index) for index in range(len(inputs.augments)))
    worker = AnchorWorker(engine, groups, source, receiver, [shape.hidden_size for shape in augment_shapes],
                          _checkpointer(inputs, engine, model), columns)
    losses = worker.run(run_units(inputs, source.evaluations), on_report)
    # The prefetcher may have left the next layers in flight when the last unit ended; a later gather
    # (the caller's, of the bridges) asserts on in-flight parameters, so every parameter is released here.
    engine.empty_partition_cache()
    return {"role": groups.role.name, "losses": losses, "engine": engine, "optimizer": optimizer, "model": model}


def run_worker(inputs: RunInputs, rank: int, world_size: int, store, on_report=None) -> dict:
    """Runs this rank's role. The anchor ranks' default group stays up (the caller may gather the bridges
    through it); the caller ends with ``groups.leave_process_groups()``."""
    from calm_dist.quiet import quiet_libraries

    quiet_libraries()
    topology, augment_shapes = plan(inputs, world_size)
    parallel = inputs.parallel
    groups = init_groups(topology, rank, store, parallel.backend, parallel.timeout_s)
    if groups.role.kind == ANCHOR:
        from calm_dist.distributed.zero_anchor import init_deepspeed

        init_deepspeed(groups.backend)
        result = run_anchor_role(inputs, groups, augment_shapes, on_report)
    else:
        result = run_augment_role(inputs, groups)
    groups.close_transport()  # the default group stays for the caller: see groups.leave_process_groups
    return result
