"""bf16 against fp32 for the composition step, on demo-sized models: one process and one ZeRO-3 anchor rank.

Run: ``python -m benchmarks.bench_precision [--quick]``. One JSON line per figure on stdout, logs on stderr.

Models: random Llamas of the default job's sizes (anchor hidden 192, 4 layers, 6 heads, MLP 384; augment hidden
128, 4 layers, 4 heads, MLP 256; 1,024 embedding rows), saved with save_pretrained; bridges after every anchor
layer reading the augment layer of the same index (``configs/kv_arithmetic.yaml``'s connections). One fixed
batch of 128 rows x 10 tokens, the last 3 of each row labelled (prompt/completion rows of that length).

1. composition_step_time_ratio_bf16_vs_fp32_one_process: the single-process step as ``train_in_process`` runs it
   (forward with logits only where labelled, backward, clipping, AdamW, schedule), bf16 (``deepspeed.bf16``:
   bf16 base models as ``build_local_model`` loads them, the forward under ``in_precision``'s autocast, fp32
   bridges) over fp32; both models built once, timed round-robin in one process with 2 threads.
2. anchor_rank_step_time_ratio_bf16_vs_fp32: one ZeRO-3 anchor rank's ``AnchorWorker._train_step`` with a bf16
   engine over an fp32 engine, the augment states given (bf16 / fp32 as they arrive over each wire), timed
   round-robin in one spawned rank with 2 threads.

On a CPU without bf16 matmul kernels (no AVX512-BF16 or AMX) bf16 is slower than fp32 and both figures exceed
1; the figure's ``cpu_bf16_kernels`` says which kind of CPU measured it.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

from benchmarks._common import (LlamaSize, anchor_only_groups, anchor_worker, claim_stdout, ensure_model,
                                figure_line, init_anchor_world, log, median, spawn_ranks, time_round_robin)
from calm_dist.model.loss import IGNORE_INDEX

ANCHOR, AUGMENT = LlamaSize(192, 4, 6, 384, vocab=1024), LlamaSize(128, 4, 4, 256, vocab=1024)
CONNECTIONS = (((0, 0), (1, 1), (2, 2), (3, 3)),)
ROWS, LENGTH, LABELLED = 128, 10, 3
THREADS = 2


@dataclasses.dataclass(frozen=True)
class Mode:
    warmup: int
    repeats: int


DEFAULT_MODE, QUICK_MODE = Mode(warmup=5, repeats=40), Mode(warmup=1, repeats=3)


def cpu_has_bf16_kernels() -> bool:
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def fixed_batch() -> tuple[dict, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, ANCHOR.vocab, (ROWS, LENGTH), generator=generator)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -LABELLED:] = ids[:, -LABELLED:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, generator


def train_settings():
    from calm_dist.config import TrainConfig

    return TrainConfig(max_steps=10_000, batch_size=ROWS, lr=3e-4, warmup_steps=50)


def one_process_step(anchor_dir: Path, augment_dir: Path, batch: dict, bf16: bool):
    """The single-process composition step, as ``train_in_process`` runs it, in fp32 or bf16."""
    from calm_dist.config import DeepSpeedConfig
    from calm_dist.model.composed import CompositionSpec
    from calm_dist.model.layers import model_shape
    from calm_dist.optim import OptimSettings, make_optimizer
    from calm_dist.train.evaluate import calm_statistics
    from calm_dist.train.local import in_precision
    from calm_dist.train.models import load_causal_lm

    dtype = DeepSpeedConfig(bf16=bf16).base_model_dtype
    augment = load_causal_lm(augment_dir, "augment", dtype)
    model = CompositionSpec(CONNECTIONS, seed=1).build(load_causal_lm(anchor_dir, "anchor", dtype), [augment],
                                                       [model_shape(augment)]).train()
    statistics = in_precision(calm_statistics(model), bf16, "cpu")
    parameters = model.trainable_parameters()
    train = train_settings()
    optimizer, schedule = make_optimizer(parameters, OptimSettings.of(train))

    def step() -> float:
        loss = statistics(batch).mean_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, train.grad_clip)
        optimizer.step()
        schedule.step()
        return float(loss.detach())

    return step


def anchor_rank_timing(rank: int, world_size: int, anchor_dir: str, mode: Mode) -> dict:
    """Both engines in one anchor rank (world of 1); median seconds of each step."""
    from calm_dist.config import DeepSpeedConfig
    from calm_dist.distributed.zero_anchor import build_engine, configure_anchor, deepspeed_config, load_partitioned
    from calm_dist.model.composed import CompositionSpec
    from calm_dist.model.layers import ModelShape

    init_anchor_world()
    batch, generator = fixed_batch()
    states = [torch.randn(ROWS, LENGTH, AUGMENT.hidden, generator=generator) for _ in CONNECTIONS[0]]
    shapes = [ModelShape(AUGMENT.layers, AUGMENT.hidden, AUGMENT.heads, AUGMENT.vocab)]
    groups = anchor_only_groups(1, 0, [layer for layer, _ in CONNECTIONS[0]], AUGMENT.layers)
    steps = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        ds = DeepSpeedConfig(bf16=bf16)
        anchor = configure_anchor(load_partitioned(anchor_dir, deepspeed_config(ds, train_settings(), ROWS)), ds)
        engine, _, _ = build_engine(CompositionSpec(CONNECTIONS, seed=1).build(anchor, None, shapes), ds,
                                    train_settings(), ROWS)
        wire_states = [state.to(torch.bfloat16 if bf16 else torch.float32) for state in states]
        steps[name] = partial(anchor_worker(engine, groups, AUGMENT.hidden)._train_step, batch, wire_states)
    times = time_round_robin(steps, mode.warmup, mode.repeats, "anchor rank step")
    return {name: median(values) for name, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke test)")
    args = parser.parse_args(argv)
    mode = QUICK_MODE if args.quick else DEFAULT_MODE
    out = claim_stdout()
    torch.set_num_threads(THREADS)
    kernels = cpu_has_bf16_kernels()
    with tempfile.TemporaryDirectory() as work:
        anchor_dir, augment_dir = Path(work) / "anchor", Path(work) / "augment"
        ensure_model(ANCHOR, 0, anchor_dir)
        ensure_model(AUGMENT, 1, augment_dir)
        batch, _ = fixed_batch()
        steps = {"fp32": one_process_step(anchor_dir, augment_dir, batch, False),
                 "bf16": one_process_step(anchor_dir, augment_dir, batch, True)}
        times = {name: median(values) for name, values in
                 time_round_robin(steps, mode.warmup, mode.repeats, "one-process step").items()}
        common = dict(cpu_bf16_kernels=kernels, threads=THREADS, batch=[ROWS, LENGTH], labelled_per_row=LABELLED,
                      repeats=mode.repeats, quick=args.quick)
        print(figure_line("composition_step_time_ratio_bf16_vs_fp32_one_process", times["bf16"] / times["fp32"],
                          1.0, "lower", fp32_step_s=round(times["fp32"], 5), bf16_step_s=round(times["bf16"], 5),
                          **common), file=out, flush=True)
        log("anchor rank: one spawned ZeRO-3 rank, fp32 and bf16 engines")
        rank = spawn_ranks(anchor_rank_timing, 1, (str(anchor_dir), mode), Path(work) / "rank", threads=THREADS)[0]
        print(figure_line("anchor_rank_step_time_ratio_bf16_vs_fp32", rank["bf16"] / rank["fp32"], 1.0, "lower",
                          fp32_step_s=round(rank["fp32"], 5), bf16_step_s=round(rank["bf16"], 5), **common),
              file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
