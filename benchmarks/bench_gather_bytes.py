"""Bytes each ZeRO-3 anchor rank receives per training step, measured against the cost model's prediction.

Run: ``python -m benchmarks.bench_gather_bytes [--quick]``. One JSON line per rank count (2 and 4) on stdout.

N anchor ranks (spawned processes, gloo) load a random Llama with ``load_partitioned`` (persistence
threshold 0: every parameter partitioned; the project's other ``deepspeed.*`` defaults), compose it as every
anchor rank does (``CompositionSpec.build`` without the augmenting model; bridges after anchor layers
``CONNECTIONS``), and run ``STEPS`` real training steps (``AnchorWorker._train_step``) on given batches and
augment states. DeepSpeed's collectives all pass through its communication backend object
(``deepspeed.comm.comm.cdb``); its all-gather and reduce-scatter methods are wrapped to count, per step,
the bytes of every gathered output and what arrived from the other ranks (output minus the rank's own
input). The prediction is ``benchmarks.cost_model``'s: every parameter gathered in forward, the bridges,
the anchor layers above the first bridge, the final norm and the LM head again in backward, each gather
bringing (N-1)/N of its bytes from the other ranks.

Figure per N: |measured / predicted - 1| of the bytes received per step (median over the steps after
the first; DeepSpeed traces the first), goal <= 0.05. Extra keys: the ratio, per-step bytes, the
reduce-scatter bytes of the bridges' gradients against theirs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import (LlamaSize, anchor_only_groups, anchor_worker, claim_stdout, ensure_model, figure_line,
                                init_anchor_world, log, median, spawn_ranks)
from benchmarks.cost_model import Composition, DecoderSize, received_bytes

DEFAULT_SIZE = LlamaSize(256, 8, 4, 688, vocab=4096)
QUICK_SIZE = LlamaSize(128, 4, 4, 256, vocab=1024)
AUGMENT_HIDDEN = 64
STEPS = 4
MICRO_BATCH, SEQ_LEN = 2, 16
RANK_COUNTS = (2, 4)
GOAL = 0.05


def connections_for(size: LlamaSize) -> tuple[tuple[int, int], ...]:
    """Two bridges: one a quarter of the way up (backward runs above it), one at the top third."""
    return ((0, size.layers // 4), (1, 2 * size.layers // 3))


def composition_of(size: LlamaSize) -> Composition:
    anchor = size.decoder_size()
    augment = DecoderSize(AUGMENT_HIDDEN, 2, 4, 4, 2 * AUGMENT_HIDDEN, size.vocab)
    return Composition(anchor, augment, connections_for(size))


class CollectiveCounter:
    """Wraps DeepSpeed's backend all-gather / reduce-scatter methods; counts bytes since the last ``take``."""

    def __init__(self):
        from deepspeed.comm import comm

        self.backend = comm.cdb
        self.gathered = self.received = self.reduce_scattered = 0
        self.calls = 0
        for name in ("all_gather_into_tensor", "all_gather", "all_gather_coalesced", "reduce_scatter_tensor"):
            setattr(self.backend, name, self._wrap(name, getattr(self.backend, name)))

    @staticmethod
    def _bytes(tensors) -> int:
        if torch.is_tensor(tensors):
            return tensors.numel() * tensors.element_size()
        return sum(t.numel() * t.element_size() for t in tensors)

    ARGUMENTS = {"all_gather_into_tensor": ("output_tensor", "input_tensor"), "all_gather": ("tensor_list", "tensor"),
                 "all_gather_coalesced": ("output_tensors", "input_tensors"),
                 "reduce_scatter_tensor": ("output_tensor", "input_tensor")}

    def _wrap(self, name: str, method):
        def counted(*args, **kwargs):
            output, given = (kwargs[key] if key in kwargs else args[index]
                             for index, key in enumerate(self.ARGUMENTS[name]))
            if name == "reduce_scatter_tensor":
                self.reduce_scattered += self._bytes(given)
            else:  # what arrived is the output less this rank's own input
                self.gathered += self._bytes(output)
                self.received += self._bytes(output) - self._bytes(given)
            self.calls += 1
            return method(*args, **kwargs)

        return counted

    def take(self) -> dict:
        counts = {"gathered": self.gathered, "received": self.received, "reduce_scattered": self.reduce_scattered,
                  "calls": self.calls}
        self.gathered = self.received = self.reduce_scattered = self.calls = 0
        return counts


def gather_rank(rank: int, world_size: int, model_dir: str, size: LlamaSize) -> dict:
    from calm_dist.config import load_config
    from calm_dist.distributed.zero_anchor import build_engine, configure_anchor, deepspeed_config, load_partitioned
    from calm_dist.model.composed import CompositionSpec
    from calm_dist.model.layers import ModelShape

    init_anchor_world()
    config = load_config(None, ["deepspeed.param_persistence_threshold=0",
                                f"train.batch_size={world_size * MICRO_BATCH}"])
    anchor = load_partitioned(model_dir, deepspeed_config(config.deepspeed, config.train, MICRO_BATCH))
    anchor = configure_anchor(anchor, config.deepspeed)
    connections = connections_for(size)
    model = CompositionSpec((connections,), seed=1).build(anchor, None, [ModelShape(2, AUGMENT_HIDDEN, 4, size.vocab)])
    engine, _, _ = build_engine(model, config.deepspeed, config.train, MICRO_BATCH)
    worker = anchor_worker(engine, anchor_only_groups(world_size, rank, [0, 1], 2), AUGMENT_HIDDEN)
    generator = torch.Generator().manual_seed(rank)
    counter = CollectiveCounter()
    steps = []
    for _ in range(STEPS):
        ids = torch.randint(1, size.vocab, (MICRO_BATCH, SEQ_LEN), generator=generator)
        labels = ids.clone()
        labels[:, : SEQ_LEN // 2] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        states = [torch.randn(MICRO_BATCH, SEQ_LEN, AUGMENT_HIDDEN, generator=generator) for _ in connections]
        counter.take()
        worker._train_step(batch, states)
        steps.append(counter.take())
    element = next(anchor.parameters()).ds_tensor.element_size()
    head = anchor.get_output_embeddings()
    head_piece_rows = head.pieces[0].out_features if hasattr(head, "pieces") else None
    return {"rank": rank, "steps": steps, "element_bytes": element,
            "partitioned_numel": sum(p.ds_numel for p in engine.module.parameters()),
            "max_live_parameters": engine.zero_max_live_parameters(),
            "head_piece_rows": head_piece_rows}


def gather_figure(size: LlamaSize, model_dir: Path, ranks: int, work: Path, quick: bool) -> str:
    started = time.perf_counter()
    results = spawn_ranks(gather_rank, ranks, (str(model_dir), size), work / f"n{ranks}")
    model = composition_of(size)
    element = results[0]["element_bytes"]
    phases = model.gathered_elements_per_step(results[0]["max_live_parameters"], results[0]["head_piece_rows"])
    predicted = received_bytes(phases["forward"] + phases["backward"], ranks, element)
    per_step = [[step["received"] for step in r["steps"]] for r in results]
    measured = max(median(steps[1:]) for steps in per_step)
    ratio = measured / predicted
    bridge_grads = model.bridge_params() * element
    reduce_scattered = median(step["reduce_scattered"] for step in results[0]["steps"][1:])
    log(f"N={ranks}: received per step {[round(b / 2**20, 2) for b in per_step[0]]} MiB (rank 0), predicted "
        f"{predicted / 2**20:.2f} MiB, ratio {ratio:.4f}")
    return figure_line(
        f"gathered_bytes_per_step_relative_error_n{ranks}", max(abs(ratio - 1), 1e-6), GOAL, "lower",
        n=ranks, measured_over_predicted=round(ratio, 5), measured_received_bytes_per_step=measured,
        predicted_received_bytes_per_step=round(predicted), received_bytes_per_step_rank0=per_step[0],
        predicted_gathered_elements=phases, model_numel=results[0]["partitioned_numel"],
        max_live_parameters=results[0]["max_live_parameters"], head_piece_rows=results[0]["head_piece_rows"],
        predicted_model_numel=model.anchor.params() + model.bridge_params(),
        reduce_scattered_bytes_per_step=reduce_scattered, bridge_gradient_bytes=bridge_grads,
        first_step_received_bytes=per_step[0][0], element_bytes=element, connections=[list(c) for c in
                                                                                         model.connections],
        model=f"llama hidden {size.hidden}, {size.layers} layers, vocab {size.vocab}", quick=quick,
        steps=STEPS, seconds=round(time.perf_counter() - started, 1),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller anchor")
    args = parser.parse_args(argv)
    figures = claim_stdout()
    size = QUICK_SIZE if args.quick else DEFAULT_SIZE
    with tempfile.TemporaryDirectory(prefix="calm_bench_gather_") as tmp:
        work = Path(tmp)
        ensure_model(size, 0, work / "anchor")
        for ranks in RANK_COUNTS:
            print(gather_figure(size, work / "anchor", ranks, work, args.quick), file=figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
