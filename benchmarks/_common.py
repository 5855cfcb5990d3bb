"""Shared pieces of the runtime benchmarks: figure output, rank spawning, inputs, timing, memory.

Only figures go to stdout. DeepSpeed's logger writes to stdout too, so ``claim_stdout`` moves file
descriptor 1 onto stderr (for this process and every child it starts) and hands back a private
handle on the real stdout for the JSON lines.
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def claim_stdout() -> TextIO:
    """A handle on the real stdout; fd 1 (prints, DeepSpeed logs, child processes) now goes to stderr."""
    sys.stdout.flush()
    figures = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return figures


def figure_line(figure: str, value: float, goal: float, better: str, **extra) -> str:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise RuntimeError(f"{figure}: measured value {value!r} is not a finite positive number")
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    value = float(f"{value:.4g}")  # 4 significant digits: small positive values stay positive
    return json.dumps({"figure": figure, "value": value, "goal": goal, "better": better, **extra})


def median(values) -> float:
    return float(statistics.median(values))


# ---------------------------------------------------------------------------------------------
# Ranks in local processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(rank: int, world_size: int, port: int, target, args, out_dir: str, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(threads)
    result = target(rank, world_size, *args)
    from calm_dist.distributed.groups import end_rank_process, leave_process_groups

    leave_process_groups()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    end_rank_process()


def spawn_ranks(target, world_size: int, args: tuple, out_dir: Path, threads: int = 1) -> list:
    """``target(rank, world_size, *args)`` in ``world_size`` fresh processes; each rank's return value.

    ``target`` must be importable (a module-level function). A failing rank terminates the others
    and its error is raised here.
    """
    import torch.multiprocessing as mp

    out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_entry, args=(world_size, free_port(), target, args, str(out_dir), threads),
             nprocs=world_size, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def init_anchor_world() -> None:
    """The anchor ranks' default group from the spawn environment, then DeepSpeed's comm layer over it."""
    import torch.distributed as dist

    from calm_dist.distributed.zero_anchor import init_deepspeed

    dist.init_process_group("gloo", init_method="env://")
    init_deepspeed("gloo")


def anchor_only_groups(anchor_ranks: int, index: int, tapped_layers, augment_layers: int):
    """A ``Groups`` for an anchor rank whose augment states are given locally (no transport group)."""
    from calm_dist.distributed.groups import Groups
    from calm_dist.distributed.topology import ANCHOR, Role, Topology

    topology = Topology(anchor_ranks, 1, (range(0, augment_layers),), tuple(tapped_layers))
    return Groups(topology, index, Role(ANCHOR, index), None, "gloo", torch.device("cpu"))


def anchor_worker(engine, groups, augment_hidden: int):
    """An anchor rank's ``AnchorWorker`` whose batches and augment states are given by the caller: its
    ``_train_step(batch, states)`` is the real training step (engine forward with logits only where labelled,
    loss, backward, step) and ``_eval_totals(batch, states)`` the real evaluation forward."""
    from calm_dist.distributed.anchor_worker import AnchorWorker

    return AnchorWorker(engine, groups, source=None, receiver=None, augment_hiddens=[augment_hidden])


# ---------------------------------------------------------------------------------------------
# Inputs: a user's project as the generic job meets it (saved random Llamas sharing a BPE tokenizer,
# prompt/completion JSONL), prepared by the job's own code (``prepare_job``, ``runtime_inputs``)

WORDS = ["red", "blue", "green", "cat", "dog", "bird", "runs", "sleeps", "sings", "the", "a", "big", "small",
         "quickly", "slowly", "near", "far", "tree", "house", "river"]
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class LlamaSize:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int = 512  # embedding rows; the bench tokenizer uses fewer (models are often padded beyond theirs)

    def hf_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.heads,
                           intermediate_size=self.intermediate, max_position_embeddings=256,
                           tie_word_embeddings=False, bos_token_id=None, pad_token_id=None, eos_token_id=0)

    def decoder_size(self):
        """The cost model's description of this Llama (``cost_model.DecoderSize``)."""
        from benchmarks.cost_model import DecoderSize

        return DecoderSize(self.hidden, self.layers, self.heads, self.heads, self.intermediate, self.vocab)

    def layer_params(self) -> int:
        return 4 * self.hidden * self.hidden + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def param_count(self) -> int:
        return self.layers * self.layer_params() + 2 * self.vocab * self.hidden + self.hidden


def _sentence(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length))


def bench_tokenizer():
    """Byte-level BPE over the word corpus (~400 tokens), EOS id 0, no BOS and no pad token."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([_sentence(rng, rng.randint(3, 9)) + " =>" for _ in range(400)], trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)


def build_model(size: LlamaSize, seed: int, target: str, max_shard_size: str | None = None) -> None:
    """A seeded random Llama saved with save_pretrained (and the bench tokenizer beside it)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(size.hf_config())
    options = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(target, **options)
    bench_tokenizer().save_pretrained(target)


def ensure_model(size: LlamaSize, seed: int, target: Path, max_shard_size: str | None = None,
                 own_process: bool = False) -> int:
    """``build_model`` unless ``target`` holds it already; ``own_process``: in a spawned process, so that its
    memory counts nowhere. Returns the parameter count."""
    if not (target / "config.json").is_file():
        if own_process:
            import multiprocessing

            process = multiprocessing.get_context("spawn").Process(
                target=build_model, args=(size, seed, str(target), max_shard_size))
            process.start()
            process.join()
            if process.exitcode != 0:
                raise RuntimeError(f"building the model at {target} failed (exit code {process.exitcode})")
        else:
            build_model(size, seed, str(target), max_shard_size)
    return size.param_count()


def prompt_completion_rows(count: int, seed: int, words: tuple[int, int] = (2, 6)) -> list[dict]:
    """``prompt`` a sentence and an arrow, ``completion`` its words reversed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        chosen = _sentence(rng, rng.randint(*words)).split()
        rows.append({"prompt": " ".join(chosen) + " =>", "completion": " " + " ".join(reversed(chosen))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def project_config(work: Path, anchor: LlamaSize, augment: LlamaSize, overrides=(), train_rows: int = 256,
                   eval_rows: int = 32, words: tuple[int, int] = (2, 6), build_anchor_apart: bool = False):
    """The generic job's config over a user project under ``work``: random anchor and augmenting Llamas saved
    with their BPE tokenizer (built once), prompt/completion JSONL data, then ``overrides``."""
    from calm_dist.config import load_config

    anchor_dir, augment_dir = work / "models" / "anchor", work / "models" / "augment"
    ensure_model(anchor, 2, anchor_dir, own_process=build_anchor_apart)
    ensure_model(augment, 1, augment_dir)
    return load_config(None, [
        f"run.output_dir={work / 'runs'}", f"run.cache_dir={work / 'cache'}", "run.name=bench",
        f"anchor.model.path={anchor_dir}", f"augment.model.path={augment_dir}",
        f"data.train={write_jsonl(work / 'data' / 'train.jsonl', prompt_completion_rows(train_rows, 3, words))}",
        f"data.eval={write_jsonl(work / 'data' / 'eval.jsonl', prompt_completion_rows(eval_rows, 4, words))}",
        "data.max_length=64", "train.warmup_steps=1", "parallel.timeout_s=300", *overrides])


def prepare_project(work: Path, anchor: LlamaSize, augment: LlamaSize, overrides=(), **options):
    """(prepared job, RunInputs) over ``project_config``: checked and tokenised by ``prepare_job``, the
    ranks' inputs made by ``runtime_inputs``, as the launcher does."""
    from calm_dist.train.job import prepare_job
    from launcher.runtime import runtime_inputs

    job = prepare_job(project_config(work, anchor, augment, overrides, **options), log=lambda _: None)
    return job, runtime_inputs(job)


# ---------------------------------------------------------------------------------------------
# Timing and memory


def time_round_robin(step_fns: dict[str, Callable[[], object]], warmup: int, repeats: int,
                     label: str) -> dict[str, list[float]]:
    """Seconds per call of each function; every repetition runs each once, in a rotated order."""
    names = list(step_fns)
    for _ in range(warmup):
        for name in names:
            step_fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(repeats):
        shift = index % len(names)
        order = names[shift:] + names[:shift]
        for name in order if index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            step_fns[name]()
            times[name].append(time.perf_counter() - start)
        log(f"{label} {index + 1}/{repeats}: " + " ".join(f"{n}={times[n][-1] * 1e3:.1f}ms" for n in names))
    return times


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
