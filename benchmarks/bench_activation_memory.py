"""Activation memory of a composition step per token of micro-batch, against the cost model's formula.

Run: ``python -m benchmarks.bench_activation_memory [--quick]``. Three JSON lines on stdout.

The composed model is the one an anchor rank trains (``CALMModel`` with the anchor's linear layers as
``FrozenLinear``, as ``deepspeed.frozen_linear`` makes them; activations are not partitioned by ZeRO-3, so
one process shows what a rank keeps): a random Llama anchor (hidden 512, 6 layers, 8 heads, MLP 1376,
vocabulary 1000) and augment (hidden 256, 4 layers), bridges after anchor layers 2 and 4, fp32, rows of 128
tokens of which the second half is labelled. One step (forward with logits only where labelled, backward,
optimizer step) at ``ROWS`` micro-batch sizes, each in a fresh process (glibc's mmap threshold fixed, so
freed buffers leave the resident set); the figures are slopes over those sizes, per extra token:

* ``activation_saved_bytes_per_token_relative_error``: bytes autograd keeps for backward (every tensor its
  saved-tensor hooks see, parameters excluded, each storage once) against
  ``cost_model.saved_activation_elements`` x 4 B, as |measured / predicted - 1|. Goal: within 5%.
* ``activation_peak_growth_per_token_vs_saved``: growth of the step's peak resident memory over the bytes
  kept for backward: what backward needs on top of them at its peak (gradients in flight, kernels'
  buffers). Goal: at most 1.5.
* ``activation_peak_growth_per_token_checkpointed_vs_cost_model``: the same peak growth with
  ``deepspeed.activation_checkpointing`` (``CALMModel.checkpoint_activations``) over the cost model's
  checkpointed prediction (what it keeps while one layer is recomputed); autograd's hooks do not see inside
  checkpointed layers, so the peak is the measure. Goal: at most 1.5.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from benchmarks._common import REPO_ROOT, LlamaSize, claim_stdout, current_rss_bytes, figure_line, log
from benchmarks.cost_model import Composition, Step, saved_activation_elements

ANCHOR = LlamaSize(512, 6, 8, 1376, vocab=1000)
AUGMENT = LlamaSize(256, 4, 4, 688, vocab=1000)
CONNECTIONS = ((1, 2), (3, 4))  # (augment layer, anchor layer)
SEQ_LEN = 128
LABELLED_FRACTION = 0.5
ROWS = (2, 6)
QUICK_ROWS = (1, 2)
MMAP_THRESHOLD = 1 << 16


@dataclass(frozen=True)
class StepMemory:
    """One step at ``rows`` x SEQ_LEN tokens: bytes kept for backward and the step's peak growth."""

    rows: int
    checkpointing: bool
    saved_bytes: int  # outside checkpointed layers only
    peak_growth_bytes: int

    @property
    def tokens(self) -> int:
        return self.rows * SEQ_LEN


def predicted_saved_bytes_per_token(checkpointing: bool) -> float:
    composition = Composition(ANCHOR.decoder_size(), AUGMENT.decoder_size(), CONNECTIONS)
    step = Step(rows=1, seq_len=SEQ_LEN, labelled_fraction=LABELLED_FRACTION)
    return 4 * sum(saved_activation_elements(composition, step, checkpointing).values())


def build_composition(checkpointing: bool):
    import calm_dist
    from calm_dist.distributed.frozen_linear import use_frozen_linear
    from transformers import LlamaForCausalLM

    models = []
    for seed, size in enumerate((ANCHOR, AUGMENT)):
        torch.manual_seed(seed)
        config = size.hf_config()
        config._attn_implementation = "sdpa"
        models.append(LlamaForCausalLM(config).eval())
    model = calm_dist.compose(models[0], models[1], connections=[list(pair) for pair in CONNECTIONS])
    use_frozen_linear(model.anchor)
    return model.checkpoint_activations() if checkpointing else model


def batch(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rows)
    input_ids = torch.randint(3, ANCHOR.vocab, (rows, SEQ_LEN), generator=generator)
    labels = input_ids.clone()
    labels[:, : int(SEQ_LEN * (1 - LABELLED_FRACTION))] = -100
    return input_ids, labels


def peak_rss_since_reset() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as handle:  # "5": the peak resident set starts again from now
        handle.write("5")


def measure_step(rows: int, checkpointing: bool) -> StepMemory:
    """A warm-up step (optimizer state, the allocator), then the measured one."""
    model = build_composition(checkpointing)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    input_ids, labels = batch(rows)
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def step(record: bool) -> None:
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor) if record else nullcontext():
            loss = model(input_ids, labels=labels, logits_for="labels").loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(record=False)
    gc.collect()
    before = current_rss_bytes()
    reset_peak_rss()
    step(record=False)
    peak_growth = peak_rss_since_reset() - before
    step(record=True)
    return StepMemory(rows, checkpointing, sum(saved.values()), peak_growth)


def measure_in_fresh_process(rows: int, checkpointing: bool, threads: int) -> StepMemory:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "benchmarks.bench_activation_memory", "--child", str(rows)]
    result = subprocess.run(command + (["--checkpointing"] if checkpointing else []), cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"the step at {rows} rows failed:\n{result.stderr[-3000:]}")
    return StepMemory(**json.loads(result.stdout.splitlines()[-1]))


def per_token(small: StepMemory, large: StepMemory, field: str) -> float:
    return (getattr(large, field) - getattr(small, field)) / (large.tokens - small.tokens)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller micro-batches (a smoke test)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure_step(args.child, args.checkpointing).__dict__), flush=True)
        return 0
    out = claim_stdout()
    rows = list(QUICK_ROWS if args.quick else ROWS)
    runs = {checkpointing: [measure_in_fresh_process(count, checkpointing, args.threads) for count in rows]
            for checkpointing in (False, True)}
    for step in runs[False] + runs[True]:
        log(f"{step.rows} x {SEQ_LEN} tokens{', checkpointing' if step.checkpointing else ''}: kept for backward "
            f"{step.saved_bytes / 2**20:.1f} MiB{' outside checkpointed layers' if step.checkpointing else ''}, "
            f"peak growth {step.peak_growth_bytes / 2**20:.1f} MiB")
    saved, peak = per_token(*runs[False], "saved_bytes"), per_token(*runs[False], "peak_growth_bytes")
    checkpointed_peak = per_token(*runs[True], "peak_growth_bytes")
    predicted, predicted_checkpointed = predicted_saved_bytes_per_token(False), predicted_saved_bytes_per_token(True)
    print(figure_line("activation_saved_bytes_per_token_relative_error", max(abs(saved / predicted - 1), 1e-6), 0.05,
                      "lower", measured_over_predicted=round(saved / predicted, 5),
                      measured_bytes_per_token=round(saved, 1), predicted_bytes_per_token=round(predicted, 1),
                      rows=rows, seq_len=SEQ_LEN), file=out, flush=True)
    print(figure_line("activation_peak_growth_per_token_vs_saved", peak / saved, 1.5, "lower",
                      peak_growth_bytes_per_token=round(peak, 1), saved_bytes_per_token=round(saved, 1),
                      rows=rows, seq_len=SEQ_LEN), file=out, flush=True)
    print(figure_line("activation_peak_growth_per_token_checkpointed_vs_cost_model",
                      checkpointed_peak / predicted_checkpointed, 1.5, "lower",
                      peak_growth_bytes_per_token=round(checkpointed_peak, 1),
                      predicted_bytes_per_token=round(predicted_checkpointed, 1),
                      over_peak_without_checkpointing=round(checkpointed_peak / peak, 4), rows=rows, seq_len=SEQ_LEN),
          file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
