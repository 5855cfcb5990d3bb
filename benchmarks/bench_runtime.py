"""Distributed runtime figures: ZeRO-3 step overhead, partition sizes, wire volume, anchor stalls.

Run: ``python -m benchmarks.bench_runtime [--quick]``. One JSON line per figure on stdout, logs on
stderr. Every rank runs in its own spawned process with one torch thread, through the project's
real code paths (``load_partitioned``, ``build_engine``, ``AnchorWorker``, ``run_worker``).

Models (random weights, built by ``calm_dist.train.base_models.build_model`` over the vocabulary of
``configs/tiny.yaml``'s task data, 73 tokens):
* anchor: Llama hidden 512, 8 layers, 8 heads, MLP 1024 (~21M parameters; --quick: hidden 128, 2 layers)
* augment: Llama hidden 32, 2 layers (tiny.yaml's), far smaller than the anchor
* connections: tiny.yaml's ``[[1, -1], [0, 0], [1, 1]]``: 3 bridges reading 2 distinct augment layers

Figures
1. zero3_step_time_ratio_1rank_vs_plain: one anchor rank's ZeRO-3 step (``AnchorWorker._step``: engine
   forward, loss, backward, step) / the plain single-process CALMModel step with AdamW + clipping,
   both on one fixed batch (8 x 32 random tokens) with the same precomputed augment states, timed
   round-robin in one process. Several ``deepspeed.*`` settings are tried; the figure is the best one
   that still partitions most of the anchor, the others are extra keys. DeepSpeed's first zero.Init
   replaces ``torch.nn.functional.linear`` for the whole process and never restores it; the plain step
   runs with PyTorch's own (``with_linear``), the ZeRO-3 steps with DeepSpeed's, as in a real rank.
2. anchor_param_bytes_per_rank_times_n_over_full: 2 anchor ranks, ``load_partitioned`` with persistence
   threshold 0; the largest rank's partition bytes x 2 / the full anchor's bytes.
3. wire_bytes_per_step_over_minimum and 4. anchor_stall_fraction: one real run (1 anchor rank + 1 augment
   stage, fp32 wire, pipeline_depth 4) through ``run_worker``. 3: bytes the anchor received / (distinct
   tapped layers x micro-batch x padded length x D_A x 4), over all steps. 4: median over the steps after
   warm-up of the anchor's receive wait / its step time.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from benchmarks._common import (anchor_only_groups, anchor_step_fn, claim_stdout, figure_line, init_anchor_world,
                                log, median, model_spec, prepare_inputs, spawn_ranks, time_round_robin)


@dataclass(frozen=True)
class DsSetting:
    name: str
    persistence_threshold: int
    prefetch_bucket_size: int
    max_live_parameters: int


DEFAULT_DS = DsSetting("default", 100_000, 50_000_000, 1_000_000_000)  # calm_dist.config's defaults
DS_SETTINGS = (
    DEFAULT_DS,
    DsSetting("persist0", 0, 50_000_000, 1_000_000_000),
    DsSetting("persist3e5", 300_000, 50_000_000, 1_000_000_000),  # attention matrices (262k) stay whole
    DsSetting("no_prefetch", 100_000, 0, 1_000_000_000),
    DsSetting("live1e6", 100_000, 50_000_000, 1_000_000),
    DsSetting("persist3e5_no_prefetch", 300_000, 0, 1_000_000_000),
    DsSetting("persist_all", 10**9, 50_000_000, 1_000_000_000),  # nothing partitioned: a reference only
)
MIN_PARTITIONED_FRACTION = 0.5  # a setting counts for the figure only if it partitions this much of the anchor


@dataclass(frozen=True)
class Mode:
    anchor: tuple  # (hidden, layers, heads, intermediate)
    settings: tuple
    warmup: int
    repeats: int
    run_steps: int
    warm_steps: int
    batch: int = 8
    seq_len: int = 32


DEFAULT = Mode((512, 8, 8, 1024), DS_SETTINGS, warmup=3, repeats=21, run_steps=40, warm_steps=5)
QUICK = Mode((128, 2, 4, 256), (DEFAULT_DS, DS_SETTINGS[1]), warmup=1, repeats=3, run_steps=6, warm_steps=2)
AUGMENT = (32, 2, 2, 64)


# ---------------------------------------------------------------------------------------------
# 1. ZeRO-3 at one anchor rank against the plain model (runs inside one spawned rank)


def fixed_batch(inputs, mode: Mode, bridges: int, augment_hidden: int) -> tuple[dict, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(inputs.config.run.seed + 11)
    ids = torch.randint(3, inputs.task_data.vocab_size, (mode.batch, mode.seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    states = [torch.randn(mode.batch, mode.seq_len, augment_hidden, generator=generator) for _ in range(bridges)]
    return batch, states


def plain_step(inputs, connections, augment_shape, batch: dict, states: list):
    """The single-process CALMModel training step, as ``train_loop`` runs it."""
    from calm_dist.model.composed import CALMModel
    from calm_dist.train.base_models import load_pretrained
    from calm_dist.train.loop import OptimSettings, make_optimizer

    config = inputs.config
    anchor = load_pretrained(inputs.model_dirs["anchor"], "anchor")
    torch.manual_seed(config.run.seed + 4)
    model = CALMModel(anchor, None, connections, augment_shape, config.composition.relative_scale).train()
    parameters = model.trainable_parameters()
    optimizer, schedule = make_optimizer(parameters, OptimSettings.of(config.train))

    def step() -> float:
        loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     augment_states=states).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.train.grad_clip)
        optimizer.step()
        schedule.step()
        return float(loss.detach())

    return step


def with_linear(step, linear):
    """``step`` run with ``torch.nn.functional.linear`` set to ``linear``.

    DeepSpeed's first ``zero.Init`` replaces ``F.linear`` process-wide with its ZeRO-3 autograd
    function and never restores it; the plain baseline must run on PyTorch's own.
    """
    functional = torch.nn.functional

    def run():
        current = functional.linear
        functional.linear = linear
        try:
            return step()
        finally:
            functional.linear = current

    return run


def zero3_engine(inputs, setting: DsSetting, connections, augment_shape, micro: int):
    """The anchor loaded into ZeRO-3 partitions under ``setting`` and composed; (engine, partitioned fraction)."""
    from calm_dist.distributed.zero_anchor import build_engine, deepspeed_config, load_partitioned
    from calm_dist.model.composed import CALMModel

    config = copy.deepcopy(inputs.config)
    config.deepspeed.param_persistence_threshold = setting.persistence_threshold
    config.deepspeed.prefetch_bucket_size = setting.prefetch_bucket_size
    config.deepspeed.max_live_parameters = setting.max_live_parameters
    anchor = load_partitioned(inputs.model_dirs["anchor"], deepspeed_config(config, micro))
    torch.manual_seed(config.run.seed + 4)
    model = CALMModel(anchor, None, connections, augment_shape, config.composition.relative_scale)
    engine, _, _ = build_engine(model, config, micro)
    # ds_persist is decided by the engine (mark_persistent_parameters), not by zero.Init
    partitioned = sum(p.ds_numel for p in anchor.parameters() if not p.ds_persist)
    return engine, partitioned / sum(p.ds_numel for p in anchor.parameters())


def zero3_timing_rank(rank: int, world_size: int, inputs, mode: Mode) -> dict:
    from calm_dist.distributed.worker import plan

    torch_linear = torch.nn.functional.linear  # before any zero.Init replaces it
    init_anchor_world()
    topology, connections, augment_shapes = plan(inputs, inputs.config.parallel.anchor_ranks + 1)
    connections, augment_shape = connections[0], augment_shapes[0]
    batch, states = fixed_batch(inputs, mode, len(connections), augment_shape.hidden_size)
    groups = anchor_only_groups(1, 0, topology.tapped_layers, augment_shape.num_layers)
    steps = {"plain": with_linear(plain_step(inputs, connections, augment_shape, batch, states), torch_linear)}
    fractions = {}
    for setting in mode.settings:
        engine, fractions[setting.name] = zero3_engine(inputs, setting, connections, augment_shape, mode.batch)
        steps[setting.name] = partial(anchor_step_fn(engine, groups, augment_shape.hidden_size), batch, states)
    replaced = torch.nn.functional.linear is not torch_linear
    times = time_round_robin(steps, mode.warmup, mode.repeats, "step")
    return {"median_s": {name: median(values) for name, values in times.items()}, "partitioned": fractions,
            "deepspeed_replaced_linear": replaced}


def zero3_figure(inputs, mode: Mode, work: Path, anchor_params: int) -> str:
    result = spawn_ranks(zero3_timing_rank, 1, (inputs, mode), work / "zero3")[0]
    plain_s, fractions = result["median_s"]["plain"], result["partitioned"]
    ratios = {name: result["median_s"][name] / plain_s for name in fractions}
    eligible = [name for name in ratios if fractions[name] >= MIN_PARTITIONED_FRACTION] or list(ratios)
    best = min(eligible, key=ratios.get)
    settings = {s.name: asdict(s) for s in mode.settings}
    others = {f"ratio_{name}": round(ratio, 4) for name, ratio in ratios.items()}
    return figure_line(
        "zero3_step_time_ratio_1rank_vs_plain", ratios[best], 1.3, "lower",
        best_setting=settings[best], plain_step_s=round(plain_s, 5), best_step_s=round(result["median_s"][best], 5),
        **others, partitioned_fraction={name: round(f, 3) for name, f in fractions.items()},
        eligible_if_partitioned_fraction_at_least=MIN_PARTITIONED_FRACTION,
        anchor=f"llama hidden {mode.anchor[0]}, {mode.anchor[1]} layers, MLP {mode.anchor[3]}",
        anchor_params=anchor_params, batch=[mode.batch, mode.seq_len], repeats=mode.repeats, threads=1,
        plain_uses_torch_linear=True, deepspeed_replaced_linear_process_wide=result["deepspeed_replaced_linear"],
    )


# ---------------------------------------------------------------------------------------------
# 2. Partition bytes per rank


def partition_bytes_rank(rank: int, world_size: int, anchor_dir: Path, config) -> dict:
    from calm_dist.distributed.zero_anchor import deepspeed_config, load_partitioned

    init_anchor_world()
    config = copy.deepcopy(config)
    config.deepspeed.param_persistence_threshold = 0
    anchor = load_partitioned(anchor_dir, deepspeed_config(config, 1))
    parameters = list(anchor.parameters())
    return {
        "local_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in parameters),
        "full_bytes": sum(p.ds_numel * p.ds_tensor.element_size() for p in parameters),
        "params": sum(p.ds_numel for p in parameters),
        "tensors": len(parameters),
    }


def partition_figure(inputs, work: Path, ranks: int = 2) -> str:
    results = spawn_ranks(partition_bytes_rank, ranks, (inputs.model_dirs["anchor"], inputs.config), work / "part")
    full = results[0]["full_bytes"]
    largest = max(r["local_bytes"] for r in results)
    return figure_line(
        "anchor_param_bytes_per_rank_times_n_over_full", largest * ranks / full, 1.1, "lower",
        n=ranks, per_rank_bytes=[r["local_bytes"] for r in results], full_bytes=full,
        anchor_params=results[0]["params"], anchor_tensors=results[0]["tensors"], persistence_threshold=0,
    )


# ---------------------------------------------------------------------------------------------
# 3 and 4. A real run: 1 anchor rank + 1 augment stage


def pipeline_rank(rank: int, world_size: int, inputs) -> dict:
    from calm_dist.distributed.groups import env_store
    from calm_dist.distributed.worker import run_worker

    store, _, _ = env_store(inputs.config.parallel.timeout_s)
    reports = []
    result = run_worker(inputs, rank, world_size, store, on_step=lambda report: reports.append(asdict(report)))
    return {"role": result["role"], "reports": reports, "bytes_sent": result.get("bytes_sent")}


def batch_shapes(inputs, steps: int) -> list[tuple[int, int]]:
    """(micro-batch, padded length) of each step of anchor rank 0: its reader, replayed."""
    from calm_dist.train.composition import composition_reader

    reader = composition_reader(inputs.config, inputs.task_data, rank=0, world_size=1)
    return [tuple(next(reader)["input_ids"].shape) for _ in range(steps)]


def wire_figure(inputs, reports: list[dict], augment_hidden: int) -> str:
    from calm_dist.distributed.worker import plan

    _, (connections,), _ = plan(inputs, 2)
    distinct = len({augment for augment, _ in connections})
    shapes = batch_shapes(inputs, len(reports))
    received = sum(r["bytes_received"] for r in reports)
    per_layer = sum(b * t * augment_hidden * 4 for b, t in shapes)
    return figure_line(
        "wire_bytes_per_step_over_minimum", received / (distinct * per_layer), 1.0, "lower",
        bytes_per_step=received / len(reports), minimum_bytes_per_step=distinct * per_layer / len(reports),
        bridges=len(connections), distinct_tapped_layers=distinct,
        ratio_counting_each_bridge=round(received / (len(connections) * per_layer), 4),
        steps=len(reports), augment_hidden=augment_hidden, wire_dtype=inputs.config.parallel.wire_dtype,
    )


def stall_figure(inputs, reports: list[dict], warm_steps: int) -> str:
    measured = reports[warm_steps:]
    fractions = [r["wait_s"] / r["step_s"] for r in measured]
    load = os.getloadavg()[0]
    return figure_line(
        "anchor_stall_fraction", max(median(fractions), 1e-6), 0.05, "lower",
        median_wait_s=median(r["wait_s"] for r in measured), median_step_s=median(r["step_s"] for r in measured),
        max_fraction=float(f"{max(fractions):.3g}"), first_step_wait_s=reports[0]["wait_s"],
        first_step_s=reports[0]["step_s"], steps=len(measured), warm_up_steps=warm_steps,
        pipeline_depth=inputs.config.parallel.pipeline_depth, floor=1e-6,
        cpu_note=(f"{os.cpu_count()} cores shared by the anchor and augment processes (1 torch thread each) "
                  f"and other jobs; 1-min load average {load:.1f} at the end: a busy machine slows the "
                  "augment stage too, which can show up as stall"),
    )


def pipeline_figures(inputs, mode: Mode, work: Path, augment_hidden: int) -> list[str]:
    results = spawn_ranks(pipeline_rank, 2, (inputs,), work / "pipeline")
    reports = next(r["reports"] for r in results if r["role"].startswith("anchor"))
    if len(reports) != mode.run_steps:
        raise RuntimeError(f"expected {mode.run_steps} step reports, got {len(reports)}")
    return [wire_figure(inputs, reports, augment_hidden), stall_figure(inputs, reports, mode.warm_steps)]


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few repetitions (a smoke test)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    figures = claim_stdout()
    mode = QUICK if args.quick else DEFAULT
    overrides = [f"train.max_steps={mode.run_steps}", "parallel.anchor_ranks=1", "parallel.augment_stages=1",
                 "parallel.wire_dtype=float32", "parallel.pipeline_depth=4", "parallel.timeout_s=120"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="calm_bench_runtime_") as tmp:
        work = Path(tmp)
        inputs, counts = prepare_inputs(work, model_spec(*mode.anchor), model_spec(*AUGMENT), overrides)
        log(f"anchor {counts['anchor']:,} parameters, augment {counts['augment']:,}")
        print(zero3_figure(inputs, mode, work, counts["anchor"]), file=figures)
        print(partition_figure(inputs, work), file=figures)
        for line in pipeline_figures(inputs, mode, work, AUGMENT[0]):
            print(line, file=figures)
    log(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
