"""Distributed runtime figures: ZeRO-3 step overhead, partition sizes, wire volume, anchor stalls.

Run: ``python -m benchmarks.bench_runtime [--quick]``. One JSON line per figure on stdout, logs on
stderr. Every rank runs in its own spawned process with one torch thread, through the project's
real code paths (``prepare_job``, ``load_partitioned``, ``build_engine``, ``AnchorWorker``, ``run_worker``).

Inputs (``benchmarks._common.prepare_project``): random Llamas saved with save_pretrained over a BPE
tokenizer (~400 tokens, embeddings of 512 rows), prompt/completion JSONL rows tokenised by the job's data
pipeline.
* anchor: Llama hidden 512, 8 layers, 8 heads, MLP 1024 (~17M parameters; --quick: hidden 128, 2 layers)
* augment: Llama hidden 32, 2 layers, far smaller than the anchor
* connections ``[[1, -1], [0, 0], [1, 1]]``: 3 bridges reading 2 distinct augment layers

Figures
1. zero3_step_time_ratio_1rank_vs_plain: one anchor rank's ZeRO-3 step (``AnchorWorker._train_step``: engine
   forward with logits only where a label counts, loss, backward, step) / the plain single-process
   CALMModel step with AdamW + clipping (as ``train_in_process`` runs it), both on one fixed
   prompt/completion batch (8 x 32 random tokens, the last 16 labelled) with the same precomputed
   augment states, timed round-robin in one process. Several ``deepspeed.*`` settings are tried; the
   figure is the best one that still partitions most of the anchor, the others are extra keys.
2. anchor_param_bytes_per_rank_times_n_over_full: 2 anchor ranks, ``load_partitioned`` with persistence
   threshold 0; the largest rank's partition bytes x 2 / the full anchor's bytes.
3. wire_bytes_per_step_over_minimum and 4. anchor_stall_fraction: one real run (1 anchor rank + 1 augment
   stage, fp32 wire, pipeline_depth 4) through ``run_worker``. 3: bytes the anchor received / (distinct
   tapped layers x micro-batch x padded length x D_A x 4), over all steps. 4: median over the steps after
   warm-up of the anchor's receive wait / its step time.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from benchmarks._common import (LlamaSize, anchor_only_groups, anchor_worker, claim_stdout, figure_line,
                                init_anchor_world, log, median, prepare_project, spawn_ranks, time_round_robin)
from calm_dist.model.loss import IGNORE_INDEX


@dataclass(frozen=True)
class DsSetting:
    name: str
    persistence_threshold: int
    prefetch_bucket_size: int
    max_live_parameters: int

    def apply(self, ds):
        return dataclasses.replace(ds, param_persistence_threshold=self.persistence_threshold,
                                   prefetch_bucket_size=self.prefetch_bucket_size,
                                   max_live_parameters=self.max_live_parameters)


DEFAULT_DS = DsSetting("default", 100_000, None, None)  # calm_dist.config's defaults (auto gather limits)
DS_SETTINGS = (
    DEFAULT_DS,
    DsSetting("persist0", 0, None, None),
    DsSetting("persist3e5", 300_000, 50_000_000, 1_000_000_000),  # attention matrices (262k) stay whole
    DsSetting("no_prefetch", 100_000, 0, 1_000_000_000),
    DsSetting("live1e6", 100_000, 50_000_000, 1_000_000),
    DsSetting("persist3e5_no_prefetch", 300_000, 0, 1_000_000_000),
    DsSetting("persist_all", 10**9, 50_000_000, 1_000_000_000),  # nothing partitioned: a reference only
)
MIN_PARTITIONED_FRACTION = 0.5  # a setting counts for the figure only if it partitions this much of the anchor


@dataclass(frozen=True)
class Mode:
    anchor: LlamaSize
    settings: tuple
    warmup: int
    repeats: int
    run_steps: int
    warm_steps: int
    batch: int = 8
    seq_len: int = 32


DEFAULT = Mode(LlamaSize(512, 8, 8, 1024), DS_SETTINGS, warmup=3, repeats=21, run_steps=40, warm_steps=5)
QUICK = Mode(LlamaSize(128, 2, 4, 256), (DEFAULT_DS, DS_SETTINGS[1]), warmup=1, repeats=3, run_steps=6,
             warm_steps=2)
AUGMENT = LlamaSize(32, 2, 2, 64)
CONNECTIONS = "[[1, -1], [0, 0], [1, 1]]"


# ---------------------------------------------------------------------------------------------
# 1. ZeRO-3 at one anchor rank against the plain model (runs inside one spawned rank)


def fixed_batch(inputs, mode: Mode, bridges: int, augment_hidden: int) -> tuple[dict, list[torch.Tensor]]:
    """Random tokens, the second half of each row labelled (a prompt and its completion)."""
    generator = torch.Generator().manual_seed(inputs.seed + 11)
    ids = torch.randint(1, 400, (mode.batch, mode.seq_len), generator=generator)
    labels = ids.clone()
    labels[:, : mode.seq_len // 2] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    states = [torch.randn(mode.batch, mode.seq_len, augment_hidden, generator=generator) for _ in range(bridges)]
    return batch, states


def plain_step(inputs, augment_shapes, batch: dict, states: list):
    """The single-process CALMModel training step, as ``train_in_process`` runs it."""
    from calm_dist.optim import OptimSettings, make_optimizer
    from calm_dist.train.models import load_causal_lm

    model = inputs.composition.build(load_causal_lm(inputs.anchor_path, "anchor.model.path"), None,
                                     augment_shapes).train()
    parameters = model.trainable_parameters()
    optimizer, schedule = make_optimizer(parameters, OptimSettings.of(inputs.train))

    def step() -> float:
        loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     augment_states=states, logits_for="labels").loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, inputs.train.grad_clip)
        optimizer.step()
        schedule.step()
        return float(loss.detach())

    return step


def zero3_engine(inputs, setting: DsSetting, augment_shapes, micro: int):
    """The anchor loaded into ZeRO-3 partitions under ``setting`` and composed; (engine, partitioned fraction)."""
    from calm_dist.distributed.zero_anchor import build_engine, configure_anchor, deepspeed_config, load_partitioned

    ds = setting.apply(inputs.deepspeed)
    anchor = load_partitioned(inputs.anchor_path, deepspeed_config(ds, inputs.train, micro))
    model = inputs.composition.build(configure_anchor(anchor, ds), None, augment_shapes)
    engine, _, _ = build_engine(model, ds, inputs.train, micro)
    # ds_persist is decided by the engine (mark_persistent_parameters), not by zero.Init
    partitioned = sum(p.ds_numel for p in anchor.parameters() if not p.ds_persist)
    return engine, partitioned / sum(p.ds_numel for p in anchor.parameters())


def zero3_timing_rank(rank: int, world_size: int, inputs, mode: Mode) -> dict:
    from calm_dist.distributed.worker import plan

    init_anchor_world()
    topology, augment_shapes = plan(inputs.with_anchor_ranks(1), 2)
    bridges, hidden = len(inputs.composition.connections[0]), augment_shapes[0].hidden_size
    batch, states = fixed_batch(inputs, mode, bridges, hidden)
    groups = anchor_only_groups(1, 0, topology.tapped_layers, augment_shapes[0].num_layers)
    steps = {"plain": plain_step(inputs, augment_shapes, batch, states)}
    fractions = {}
    for setting in mode.settings:
        engine, fractions[setting.name] = zero3_engine(inputs, setting, augment_shapes, mode.batch)
        steps[setting.name] = partial(anchor_worker(engine, groups, hidden)._train_step, batch, states)
    times = time_round_robin(steps, mode.warmup, mode.repeats, "step")
    return {"median_s": {name: median(values) for name, values in times.items()}, "partitioned": fractions}


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
        anchor=f"llama hidden {mode.anchor.hidden}, {mode.anchor.layers} layers, MLP {mode.anchor.intermediate}",
        anchor_params=anchor_params, batch=[mode.batch, mode.seq_len], labelled_per_row=mode.seq_len // 2,
        repeats=mode.repeats, threads=1,
    )


# ---------------------------------------------------------------------------------------------
# 2. Partition bytes per rank


def partition_bytes_rank(rank: int, world_size: int, inputs) -> dict:
    from calm_dist.distributed.zero_anchor import deepspeed_config, load_partitioned

    init_anchor_world()
    ds = dataclasses.replace(inputs.deepspeed, param_persistence_threshold=0)
    anchor = load_partitioned(inputs.anchor_path, deepspeed_config(ds, inputs.train, 1))
    parameters = list(anchor.parameters())
    return {
        "local_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in parameters),
        "full_bytes": sum(p.ds_numel * p.ds_tensor.element_size() for p in parameters),
        "params": sum(p.ds_numel for p in parameters),
        "tensors": len(parameters),
    }


def partition_figure(inputs, work: Path, ranks: int = 2) -> str:
    results = spawn_ranks(partition_bytes_rank, ranks, (inputs,), work / "part")
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
    from calm_dist.reports import StepReport

    store, _, _ = env_store(inputs.parallel.timeout_s)
    reports = []
    result = run_worker(inputs, rank, world_size, store,
                        on_report=lambda report: reports.append(asdict(report)) if isinstance(report, StepReport)
                        else None)
    return {"role": result["role"], "reports": reports, "bytes_sent": result.get("bytes_sent")}


def batch_shapes(inputs, steps: int) -> list[tuple[int, int]]:
    """(micro-batch, padded length) of each step of anchor rank 0: its reader, replayed."""
    from calm_dist.distributed.worker import train_reader

    reader = train_reader(inputs, 0)
    return [tuple(next(reader)["input_ids"].shape) for _ in range(steps)]


def wire_figure(inputs, reports: list[dict], augment_hidden: int) -> str:
    connections = inputs.composition.connections[0]
    distinct = len({augment for augment, _ in connections})
    shapes = batch_shapes(inputs, len(reports))
    received = sum(r["bytes_received"] for r in reports)
    per_layer = sum(b * t * augment_hidden * 4 for b, t in shapes)
    return figure_line(
        "wire_bytes_per_step_over_minimum", received / (distinct * per_layer), 1.0, "lower",
        bytes_per_step=received / len(reports), minimum_bytes_per_step=distinct * per_layer / len(reports),
        bridges=len(connections), distinct_tapped_layers=distinct,
        ratio_counting_each_bridge=round(received / (len(connections) * per_layer), 4),
        steps=len(reports), augment_hidden=augment_hidden, wire_dtype=inputs.parallel.wire_dtype,
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
        pipeline_depth=inputs.parallel.pipeline_depth, floor=1e-6,
        cpu_note=(f"{os.cpu_count()} cores shared by the anchor and augment processes (1 torch thread each) "
                  f"and other jobs; 1-min load average {load:.1f} at the end: a busy machine slows the "
                  "augment stage too, which can show up as stall"),
    )


def pipeline_figures(inputs, mode: Mode, work: Path) -> list[str]:
    results = spawn_ranks(pipeline_rank, 2, (inputs,), work / "pipeline")
    reports = next(r["reports"] for r in results if r["role"].startswith("anchor"))
    if len(reports) != mode.run_steps:
        raise RuntimeError(f"expected {mode.run_steps} step reports, got {len(reports)}")
    return [wire_figure(inputs, reports, AUGMENT.hidden), stall_figure(inputs, reports, mode.warm_steps)]


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few repetitions (a smoke test)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    figures = claim_stdout()
    mode = QUICK if args.quick else DEFAULT
    overrides = [f"composition.connections={CONNECTIONS}", f"train.max_steps={mode.run_steps}", "train.batch_size=8",
                 "eval.batch_size=32", "parallel.anchor_ranks=1", "parallel.augment_stages=1",
                 "parallel.wire_dtype=float32", "parallel.pipeline_depth=4", "parallel.timeout_s=120"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="calm_bench_runtime_") as tmp:
        work = Path(tmp)
        _, inputs = prepare_project(work, mode.anchor, AUGMENT, overrides)
        log(f"anchor {mode.anchor.param_count():,} parameters, augment {AUGMENT.param_count():,}")
        print(zero3_figure(inputs, mode, work, mode.anchor.param_count()), file=figures)
        print(partition_figure(inputs, work), file=figures)
        for line in pipeline_figures(inputs, mode, work):
            print(line, file=figures)
    log(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
