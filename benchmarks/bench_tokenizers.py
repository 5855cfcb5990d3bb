"""Figures of composing models whose tokenizers differ: wire bytes on the distributed runtime, and what
re-tokenising the growing text costs in generation.

Run: ``python -m benchmarks.bench_tokenizers [--quick]``. One JSON line per figure on stdout, logs on stderr.

The pair is the test suite's user project (``tests/user_project.py``): a Llama anchor with a byte-level BPE
tokenizer (no BOS, merges across spaces) and an augmenting Llama with a tokenizer of its own that cuts text
into chunks of 2 characters (so its sequences are ~2.6x the anchor's and its tokens straddle the BPE tokens).

Figures
1. wire_bytes_per_step_over_minimum_own_tokenizer: one real run (1 ZeRO-3 anchor rank + 1 augment stage, fp32
   wire) of the generic job through ``run_worker``: bytes the anchor received over the training steps / the
   minimum for the augment's own sequence length (distinct tapped layers x micro-batch x the augment
   tokenisation's padded length of that micro-batch x D_A x 4), the lengths replayed from the same reader.
2. generation_own_tokenizer_cached_over_recompute_time: ``generate_text`` on the same kind of pair (wider models,
   so compute dominates; random weights, EOS never stops a row), seconds per generated token with every cache
   kept across re-tokenisation (``use_cache=True``) / with the whole aligned forward recomputed every step
   (``use_cache=False``), interleaved in one process with the same prompt through the shared-tokenizer cached
   path (``CALMModel.generate``, an augmenting model of the anchor's vocabulary) for scale. Extra keys:
   positions each model computed per new token either way.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks._common import claim_stdout, figure_line, log, median, spawn_ranks

CONNECTIONS = "[[1, 0], [2, 2]]"


@dataclass(frozen=True)
class Mode:
    steps: int
    prompt_words: int
    new_tokens: int
    repeats: int
    hidden: tuple[int, int]  # generation: anchor, augment widths


DEFAULT = Mode(steps=12, prompt_words=60, new_tokens=48, repeats=5, hidden=(256, 128))
QUICK = Mode(steps=3, prompt_words=12, new_tokens=8, repeats=1, hidden=(64, 32))


# ---------------------------------------------------------------------------------------------
# 1. Wire bytes on the runtime


def pipeline_rank(rank: int, world_size: int, inputs) -> dict:
    from calm_dist.distributed.groups import env_store
    from calm_dist.distributed.worker import run_worker

    store, _, _ = env_store(inputs.parallel.timeout_s)
    reports = []
    result = run_worker(inputs, rank, world_size, store, on_report=reports.append)
    return {"role": result["role"], "reports": [dataclasses.asdict(r) for r in reports if hasattr(r, "bytes_received")]}


def wire_figure(work: Path, mode: Mode) -> str:
    import data_pipeline as dp
    from launcher.runtime import runtime_inputs
    from tests.user_project import make_project, prepared_job, save_own_tokenizer_augment

    project = make_project(work / "project")
    own = save_own_tokenizer_augment(project, 2, False)
    job = prepared_job(project, work, f"augment={{model: {{path: {own}}}, connections: {CONNECTIONS}}}",
                       f"train.max_steps={mode.steps}", "parallel.wire_dtype=float32")
    inputs = runtime_inputs(job)
    results = spawn_ranks(pipeline_rank, inputs.world_size, (inputs,), work / "ranks")
    reports = next(r["reports"] for r in results if r["role"].startswith("anchor"))
    if len(reports) != mode.steps:
        raise RuntimeError(f"expected {mode.steps} step reports, got {len(reports)}")
    column = job.data.augment_columns[0]
    layout = dp.BatchLayout(True, False, ((column, 0),))
    reader = dp.ShardedReader(job.data.train, job.config.train.batch_size, seed=job.config.run.seed, layout=layout)
    batches = [next(reader) for _ in range(mode.steps)]
    hidden = job.models.augment_facts[0].shape.hidden_size
    taps = len({augment_layer for augment_layer, _ in job.models.composition.connections[0]})
    minimum = sum(batch[f"{column}_input_ids"].numel() for batch in batches) * taps * hidden * 4
    received = sum(r["bytes_received"] for r in reports)
    augment_tokens = sum(batch[f"{column}_input_ids"].numel() for batch in batches)
    anchor_tokens = sum(batch["input_ids"].numel() for batch in batches)
    return figure_line(
        "wire_bytes_per_step_over_minimum_own_tokenizer", received / minimum, 1.0, "lower",
        bytes_per_step=received / mode.steps, minimum_bytes_per_step=minimum / mode.steps, steps=mode.steps,
        distinct_tapped_layers=taps, augment_hidden=hidden, wire_dtype="float32",
        augment_over_anchor_padded_length=round(augment_tokens / anchor_tokens, 3),
        pair="byte-level BPE anchor, augment reading chunks of 2 characters",
    )


# ---------------------------------------------------------------------------------------------
# 2. Generation: caches kept across re-tokenisation against a full recomputation every step


def composed_pair(mode: Mode, augment_vocab: int | None):
    """The anchor (BPE vocabulary) composed with an augmenting model of ``augment_vocab`` tokens (its own
    tokenizer's), or of the anchor's vocabulary (None: the shared-tokenizer path); same seeds either way."""
    import calm_dist
    from tests.user_project import bpe_tokenizer, tiny_causal_lm

    anchor_tokenizer = bpe_tokenizer()
    anchor_hidden, augment_hidden = mode.hidden
    anchor = tiny_causal_lm("llama", len(anchor_tokenizer), hidden=anchor_hidden, layers=4, heads=4, seed=1,
                            eos_id=anchor_tokenizer.eos_token_id)
    augment = tiny_causal_lm("llama", augment_vocab or len(anchor_tokenizer), hidden=augment_hidden, layers=4,
                             heads=4, seed=2, eos_id=anchor_tokenizer.eos_token_id)
    for model in (anchor, augment):
        model.config.max_position_embeddings = 4096
    model = calm_dist.compose(anchor, augment, connections=[(1, 0), (3, 2)], shared_tokenizer=augment_vocab is None,
                              seed=3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for bridge in model.bridges:
            bridge.o_proj.weight.normal_(0, 0.3, generator=generator)
    return model, anchor_tokenizer


def generation_figure(mode: Mode) -> str:
    import random

    from calm_dist.model.generation import generate_text
    from tests.user_project import WORDS, chunk_tokenizer

    torch.set_num_threads(1)
    augment_tokenizer = chunk_tokenizer(2, False)
    model, anchor_tokenizer = composed_pair(mode, len(augment_tokenizer))
    rng = random.Random(5)
    prompt = " ".join(rng.choice(WORDS) for _ in range(mode.prompt_words)) + " =>"
    shared, _ = composed_pair(mode, None)
    ids = torch.tensor([anchor_tokenizer(prompt)["input_ids"]])
    runs = {"cached": lambda: generate_text(model, anchor_tokenizer, [augment_tokenizer], [prompt], mode.new_tokens,
                                            eos_token_id=None, use_cache=True),
            "recomputed": lambda: generate_text(model, anchor_tokenizer, [augment_tokenizer], [prompt],
                                                mode.new_tokens, eos_token_id=None, use_cache=False),
            "shared": lambda: shared.generate(ids, max_new_tokens=mode.new_tokens, eos_token_id=None)}
    timings = {name: [] for name in runs}
    outputs = {}
    for repeat in range(mode.repeats):  # interleaved, in a rotated order, so load changes hit every run alike
        names = list(runs)[repeat % len(runs):] + list(runs)[:repeat % len(runs)]
        for name in names:
            started = time.perf_counter()
            outputs[name] = runs[name]()
            timings[name].append((time.perf_counter() - started) / mode.new_tokens)
    if outputs["cached"].new_token_ids != outputs["recomputed"].new_token_ids:
        raise RuntimeError("cached and recomputed generation disagree")
    outputs.pop("shared")
    cached_s, recomputed_s = median(timings["cached"]), median(timings["recomputed"])
    per_token = {name: [round(count / mode.new_tokens, 1) for count in outputs[name].work] for name in outputs}
    text = outputs["cached"].texts[0]
    return figure_line(
        "generation_own_tokenizer_cached_over_recompute_time", cached_s / recomputed_s, 0.5, "lower",
        cached_ms_per_token=round(cached_s * 1e3, 2), recomputed_ms_per_token=round(recomputed_s * 1e3, 2),
        shared_tokenizer_cached_ms_per_token=round(median(timings["shared"]) * 1e3, 2),
        positions_per_new_token={"cached": per_token["cached"], "recomputed": per_token["recomputed"],
                                 "order": ["anchor", "augment"]},
        prompt_anchor_tokens=int(ids.shape[1]), final_augment_tokens=len(augment_tokenizer(text)["input_ids"]),
        new_tokens=mode.new_tokens, repeats=mode.repeats, threads=1, batch=1,
        models=f"llama anchor hidden {mode.hidden[0]} x 4 layers, augment hidden {mode.hidden[1]} x 4 layers",
    )


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps and tokens, small models (a smoke test)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    figures = claim_stdout()
    mode = QUICK if args.quick else DEFAULT
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="calm_bench_tokenizers_") as tmp:
        print(wire_figure(Path(tmp), mode), file=figures)
    print(generation_figure(mode), file=figures)
    log(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
