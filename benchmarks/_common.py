"""Shared pieces of the runtime benchmarks: figure output, rank spawning, inputs, timing, memory.

Only figures go to stdout. DeepSpeed's logger writes to stdout too, so ``claim_stdout`` moves file
descriptor 1 onto stderr (for this process and every child it starts) and hands back a private
handle on the real stdout for the JSON lines.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"


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
    from calm_dist.distributed.groups import leave_process_groups

    leave_process_groups()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


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


def anchor_step_fn(engine, groups, augment_hidden: int) -> Callable[[dict, list], tuple[float, int]]:
    """The anchor rank's real training step (``AnchorWorker._step``) on a given batch and augment states."""
    from calm_dist.distributed.anchor_worker import AnchorWorker

    worker = AnchorWorker(engine, groups, reader=None, receiver=None, augment_hiddens=[augment_hidden])
    return worker._step


# ---------------------------------------------------------------------------------------------
# Inputs: the tiny task data, with random base models of the sizes a benchmark wants


def model_spec(hidden: int, layers: int, heads: int, intermediate: int):
    from calm_dist.config import ModelConfig

    return ModelConfig(arch="llama", hidden_size=hidden, num_layers=layers, num_heads=heads,
                       intermediate_size=intermediate)


def save_random_model(spec, vocab_size: int, special_ids: dict, seed: int, target: Path) -> int:
    """A seeded random model built by the project's ``build_model``, saved with save_pretrained."""
    from calm_dist.train.base_models import build_model

    if not (target / "config.json").is_file():
        build_model(spec, vocab_size, special_ids, seed).save_pretrained(target)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target))
    return sum(p.numel() for p in model.parameters())


def prepare_inputs(work_dir: Path, anchor_spec, augment_spec, overrides=()):
    """RunInputs from configs/tiny.yaml + ``overrides``, its task data, and random anchor/augment models."""
    from calm_dist.config import load_config
    from calm_dist.distributed.worker import RunInputs
    from calm_dist.train.task_data import prepare_task_data

    config = load_config(TINY_CONFIG, [f"run.cache_dir={work_dir / 'cache'}", *overrides])
    task_data = prepare_task_data(config)
    model_dirs = {side: work_dir / f"{side}-model" for side in ("anchor", "augment")}
    counts = {}
    for side, spec in (("anchor", anchor_spec), ("augment", augment_spec)):
        seed = config.run.seed + (2 if side == "anchor" else 1)
        counts[side] = save_random_model(spec, task_data.vocab_size, task_data.special_ids, seed, model_dirs[side])
        getattr(config, side).model = dataclasses.replace(spec, path=str(model_dirs[side]))
    return RunInputs(config, task_data, model_dirs), counts


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
