"""Peak memory of one ZeRO-3 anchor rank, as a fraction of the full anchor, at 2 and 4 anchor ranks.

Run: ``python -m benchmarks.bench_anchor_memory [--quick]``. One JSON line per rank count on stdout.

A random Llama (default: hidden 1536, 16 layers, 12 heads, MLP 4096, vocabulary 32000: 0.55B
parameters, 2.2 GB in fp32; --quick: hidden 256, 4 layers, ~20M) is built once in a spawned process
(its memory counts nowhere) and saved with ``save_pretrained(max_shard_size="200MB")``. Then N anchor
ranks run concurrently, each in a fresh process: join the anchor world, note its RSS, load the anchor
with ``load_partitioned`` (stage 3, persistence threshold 0, ``deepspeed.return_freed_memory``, the other
``deepspeed.*`` settings at their defaults), compose it as every anchor rank does
(``CompositionSpec.build`` without the augmenting model: one bridge after the middle layer, fed by a tiny
precomputed augment state of width 64), build the engine, run 2 training steps
(``AnchorWorker._train_step``: forward with logits only where labelled, backward, optimizer step) and one
evaluation forward (``_eval_totals``) on 1 x 16 tokens, and save a checkpoint (``save_checkpoint``): the
whole life of a rank. Figure: the largest rank's (peak RSS - RSS before loading) / full fp32 anchor
bytes. Goal: 1/N + 0.1. Extra keys: the peak so far after each phase (``*_peak_over_full``). Imports that
loading triggers lazily happen before the "before" reading. Extra keys split each rank's peak into
anonymous and file-backed (mapped safetensors shards) memory, sampled every 10 ms.

Options for diagnosis: ``--set KEY=VALUE`` (config overrides for the ranks, e.g.
``deepspeed.prefetch_bucket_size=10000000``) and ``--mmap-threshold BYTES`` (glibc's
``MALLOC_MMAP_THRESHOLD_`` for the ranks: a fixed threshold stops the heap from keeping freed
full-size parameter buffers). Both are recorded in the JSON.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks._common import (LlamaSize, anchor_only_groups, anchor_worker, claim_stdout, current_rss_bytes,
                                ensure_model, figure_line, init_anchor_world, log, peak_rss_bytes, spawn_ranks)

AUGMENT_HIDDEN = 64
SEQ_LEN = 16
MICRO_BATCH = 1
RANK_COUNTS = (2, 4)
TRAIN_STEPS = 2  # the second step runs with the optimizer state the first created
CONNECTION_AUGMENT_LAYER = 0
MiB = 1 << 20


DEFAULT_SIZE = LlamaSize(1536, 16, 12, 4096, vocab=32000)
QUICK_SIZE = LlamaSize(256, 4, 4, 688, vocab=32000)


class RssSampler(threading.Thread):
    """Peaks of anonymous and file-backed resident memory (/proc/self/status), sampled every 10 ms.

    A diagnostic beside ru_maxrss: file-backed pages are mapped files (the safetensors shards).
    """

    FIELDS = ("RssAnon", "RssFile")

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks = dict.fromkeys(self.FIELDS, 0)
        self._stop_event = threading.Event()

    def _sample(self) -> None:
        with open("/proc/self/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in self.peaks:
                    self.peaks[key] = max(self.peaks[key], int(value.split()[0]) * 1024)

    def run(self) -> None:
        while not self._stop_event.wait(0.01):
            self._sample()

    def stop(self) -> dict:
        self._stop_event.set()
        self.join()
        self._sample()
        return dict(self.peaks)


# ---------------------------------------------------------------------------------------------
# One anchor rank (a spawned process)


def step_inputs(rank: int, vocab: int) -> tuple[dict, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, vocab, (MICRO_BATCH, SEQ_LEN), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return batch, [torch.randn(MICRO_BATCH, SEQ_LEN, AUGMENT_HIDDEN, generator=generator)]


def composed_engine(anchor, config):
    """The anchor composed the way every anchor rank composes it (``CompositionSpec.build`` without the
    augmenting model): one bridge after the middle layer, fed a tiny precomputed augment state."""
    from calm_dist.distributed.zero_anchor import build_engine
    from calm_dist.model.composed import CompositionSpec
    from calm_dist.model.layers import ModelShape

    layers = anchor.config.num_hidden_layers
    spec = CompositionSpec((((CONNECTION_AUGMENT_LAYER, layers // 2),),), seed=config.run.seed + 4)
    model = spec.build(anchor, None, [ModelShape(1, AUGMENT_HIDDEN, 4, anchor.config.vocab_size)])
    engine, _, _ = build_engine(model, config.deepspeed, config.train, MICRO_BATCH)
    return engine


def import_loading_code(model_dir: str) -> None:
    """What ``load_partitioned``, the engine and the step import lazily: import costs are not the anchor's memory.
    (DeepSpeed's ZeRO-3 optimizer imports its Muon module when it is built, ~40 MiB of code per process.)"""
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch._dynamo  # noqa: F401
    import transformers.initialization  # noqa: F401
    import transformers.integrations.deepspeed  # noqa: F401
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import calm_dist.checkpoint  # noqa: F401
    import calm_dist.distributed.anchor_worker  # noqa: F401
    import calm_dist.model.composed  # noqa: F401

    hf_config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):  # builds nothing real, but runs (and imports) the construction code once
        MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)](hf_config)


def memory_rank(rank: int, world_size: int, model_dir: str, work: str, overrides: tuple) -> dict:
    """One anchor rank's life: load, TRAIN_STEPS training steps, an evaluation forward, a checkpoint save.
    Peak RSS after each phase (ru_maxrss never goes down: each reading is the peak so far)."""
    from calm_dist.checkpoint import CheckpointStore, save_checkpoint
    from calm_dist.config import load_config
    from calm_dist.distributed.zero_anchor import configure_anchor, deepspeed_config, load_partitioned

    init_anchor_world()
    config = load_config(None, ["deepspeed.param_persistence_threshold=0", "deepspeed.return_freed_memory=true",
                                f"train.batch_size={world_size * MICRO_BATCH}", *overrides])
    import_loading_code(model_dir)
    gc.collect()
    before, peak_before = current_rss_bytes(), peak_rss_bytes()
    base, sampler = RssSampler(), RssSampler()
    base._sample()
    sampler.start()
    anchor = load_partitioned(model_dir, deepspeed_config(config.deepspeed, config.train, MICRO_BATCH),
                              config.deepspeed.return_freed_memory)
    anchor = configure_anchor(anchor, config.deepspeed)
    peaks = {"load": peak_rss_bytes()}
    after_load = current_rss_bytes()
    batch, states = step_inputs(rank, anchor.config.vocab_size)
    worker = anchor_worker(composed_engine(anchor, config), anchor_only_groups(world_size, rank, [0], 1),
                           AUGMENT_HIDDEN)
    losses = [worker._train_step(batch, states)[0] for _ in range(TRAIN_STEPS)]
    peaks["train"] = peak_rss_bytes()
    evaluation = worker._eval_totals(batch, states)
    peaks["eval"] = peak_rss_bytes()
    save_checkpoint(worker.engine, CheckpointStore(str(Path(work) / "checkpoints")), TRAIN_STEPS, {}, {}, keep=1)
    peaks["checkpoint"] = peak_rss_bytes()
    sampled = sampler.stop()
    partition = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in anchor.parameters())
    return {"rank": rank, "rss_before": before, "peak_before": peak_before, "rss_after_load": after_load,
            "peaks": peaks, "rss_after": current_rss_bytes(), "peak": peak_rss_bytes(),
            "partition_bytes": partition, "losses": losses, "eval_loss_sum": evaluation.loss_sum,
            "sampled_peak_increase": {key: sampled[key] - base.peaks[key] for key in sampled}}


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    quick: bool = False
    overrides: tuple = ()  # extra config overrides for the ranks, e.g. deepspeed.prefetch_bucket_size=1e7
    mmap_threshold: int | None = None  # MALLOC_MMAP_THRESHOLD_ for the ranks (None: glibc's default)
    ranks: tuple = RANK_COUNTS


PHASES = ("load", "train", "eval", "checkpoint")
GOAL_MARGIN = 0.1  # issue 18: <= 1/N + 0.1 of the full anchor over the whole life of a rank


def _log_ranks(ranks: int, results: list[dict]) -> None:
    for r in results:
        sampled = r["sampled_peak_increase"]
        phases = ", ".join(f"{phase} +{(r['peaks'][phase] - r['rss_before']) / MiB:.0f}" for phase in PHASES)
        log(f"N={ranks} rank {r['rank']}: before {r['rss_before'] / MiB:.0f} MiB, peak so far after {phases} "
            f"(anon +{sampled['RssAnon'] / MiB:.0f}, file +{sampled['RssFile'] / MiB:.0f}), "
            f"partitions {r['partition_bytes'] / MiB:.0f} MiB, losses {[round(x, 3) for x in r['losses']]}")


def memory_figure(size: LlamaSize, model_dir: Path, params: int, ranks: int, work: Path, options: Options) -> str:
    started = time.perf_counter()
    rank_work = work / f"n{ranks}"
    results = spawn_ranks(memory_rank, ranks, (str(model_dir), str(rank_work), options.overrides), rank_work)
    seconds = time.perf_counter() - started
    _log_ranks(ranks, results)
    full = params * 4
    increases = [r["peak"] - r["rss_before"] for r in results]
    return figure_line(
        f"peak_rss_per_anchor_rank_over_full_size_n{ranks}", max(increases) / full, round(1 / ranks + GOAL_MARGIN, 4),
        "lower", n=ranks, params=params, full_fp32_bytes=full, model=asdict(size), quick=options.quick,
        peak_increase_bytes_per_rank=increases,
        **{f"{phase}_peak_over_full": round(max(r["peaks"][phase] - r["rss_before"] for r in results) / full, 4)
           for phase in PHASES},
        sampled_peak_increase_anon_bytes_per_rank=[r["sampled_peak_increase"]["RssAnon"] for r in results],
        sampled_peak_increase_file_bytes_per_rank=[r["sampled_peak_increase"]["RssFile"] for r in results],
        partition_bytes_per_rank=[r["partition_bytes"] for r in results],
        rss_before_bytes_per_rank=[r["rss_before"] for r in results],
        peak_before_load_bytes_per_rank=[r["peak_before"] for r in results],
        overrides=list(options.overrides), malloc_mmap_threshold=options.mmap_threshold,
        life=(f"load, {TRAIN_STEPS} training steps + 1 evaluation forward (micro-batch {MICRO_BATCH} x {SEQ_LEN} "
              f"tokens, 1 bridge), 1 checkpoint save"), seconds=round(seconds, 1),
    )


def parse_args(argv) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~20M-parameter anchor instead of 0.55B")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the anchor ranks (repeatable), e.g. deepspeed.prefetch_bucket_size=1e7")
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="run the ranks with MALLOC_MMAP_THRESHOLD_=BYTES (a fixed glibc mmap threshold)")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANK_COUNTS), help="anchor rank counts")
    args = parser.parse_args(argv)
    return Options(args.quick, tuple(args.set), args.mmap_threshold, tuple(args.ranks))


def main(argv=None) -> int:
    options = parse_args(argv)
    figures = claim_stdout()
    if options.mmap_threshold is not None:  # read by glibc when each spawned rank starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(options.mmap_threshold)
    size = QUICK_SIZE if options.quick else DEFAULT_SIZE
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="calm_bench_memory_") as tmp:
        work = Path(tmp)
        params = ensure_model(size, 0, work / "anchor", max_shard_size="200MB", own_process=True)
        log(f"anchor: {params:,} parameters, {params * 4 / MiB:.0f} MiB in fp32")
        for ranks in options.ranks:
            print(memory_figure(size, work / "anchor", params, ranks, work, options), file=figures)
    log(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
