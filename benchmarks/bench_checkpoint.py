"""Checkpoint and recovery figures, measured on a simulated 3-node Ray cluster in one run.

Run: ``python -m benchmarks.bench_checkpoint [--quick]``. One JSON line per figure on stdout.

The job: the generic job over a user project (``benchmarks._common.project_config``: random Llamas with a
BPE tokenizer, anchor 256 x 2 layers, augment 128 x 2, prompt/completion JSONL; connections
``[[1, -1], [0, 0], [1, 1]]``: 3 bridges), 2 ZeRO-3 anchor ranks on two ``{anchor: 1}`` nodes and one augment
stage on an ``{augment: 1}`` node, a checkpoint every 10 steps, through the real driver
(``launcher.ray_driver.run_ray_job``). Once step 25 is logged, anchor rank 1's process is SIGKILLed.

Figures
1. checkpoint_bytes_over_composition_state: bytes of the final checkpoint directory (every file: the
   DeepSpeed shards, meta.json, RNG states) / (3 x composition parameters x 4 B), the fp32 weights plus
   Adam's two moments. Goal <= 1.1: nothing of the frozen models is written.
2. seconds_from_worker_kill_to_next_trained_step: the kill's wall time to the first step finished after
   it (worker-side timestamps in metrics.jsonl): detection, teardown, re-placement, worker start-up,
   DeepSpeed initialisation, checkpoint load and one step. Goal <= 60.
3. checkpoint_save_over_step_time: median seconds to write and publish a checkpoint (all ranks) / median
   training step time, over the run's checkpoints and steps. Goal <= 1: a checkpoint costs less than a step.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks._common import LlamaSize, claim_stdout, figure_line, log, project_config

NODES = [{"num_cpus": 1, "resources": {"anchor": 1}}, {"num_cpus": 1, "resources": {"anchor": 1}},
         {"num_cpus": 1, "resources": {"augment": 1}}]


ANCHOR = LlamaSize(256, 2, 4, 512)
AUGMENT = LlamaSize(128, 2, 4, 256)


def job_config(work: Path, steps: int):
    return project_config(work, ANCHOR, AUGMENT, [
        "run.launcher=ray", "run.name=bench_checkpoint", "composition.connections=[[1, -1], [0, 0], [1, 1]]",
        f"train.max_steps={steps}", "train.batch_size=8", "checkpoint.every_steps=10", "checkpoint.keep=2",
        "parallel.anchor_ranks=2", "parallel.augment_stages=1", "parallel.timeout_s=60",
        "ray.anchor_resources={anchor: 1}", "ray.augment_resources={augment: 1}", "eval.batch_size=32"])


def step_records(records: list[dict]) -> list[dict]:
    """metrics.jsonl's training-step records (evaluation records carry ``eval``)."""
    return [r for r in records if "eval" not in r]


def kill_anchor_rank_1_at(metrics: Path, step: int, killed: list) -> None:
    from calm_dist.train.report import read_jsonl

    while len(step_records(read_jsonl(metrics))) < step:
        time.sleep(0.02)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"AnchorRank1" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGKILL)
                killed.append(time.time())
                log(f"SIGKILLed anchor rank 1 (pid {pid}) after step {step}")
                return
        except OSError:
            continue


def measure(work: Path, steps: int, kill_step: int) -> dict:
    from calm_dist.train.report import read_jsonl
    from launcher.ray_job import run_ray_job
    from launcher.simulated_cluster import FAST_NODE_DEATH, simulated_cluster

    config = job_config(work, steps)
    run_dir = Path(config.run.output_dir) / config.run.name
    killed: list[float] = []
    with simulated_cluster(NODES, FAST_NODE_DEATH):
        threading.Thread(target=kill_anchor_rank_1_at, args=(run_dir / "metrics.jsonl", kill_step, killed),
                         daemon=True).start()
        run_ray_job(config)
    if not killed:
        raise RuntimeError("the anchor worker was never killed")
    records = step_records(read_jsonl(run_dir / "metrics.jsonl"))
    summary = json.loads((run_dir / "run_summary.json").read_text())
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    size = sum(f.stat().st_size for f in (run_dir / "checkpoints" / latest).rglob("*") if f.is_file())
    saves = [e["seconds"] for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "checkpoint"]
    return {
        "params": summary["composition_parameters"], "bytes": size,
        "recovery_s": min(r["time"] for r in records if r["time"] > killed[0]) - killed[0],
        "save_s": statistics.median(saves), "step_s": statistics.median(r["step_s"] for r in records),
        "restarts": summary["restarts"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps (tests)")
    args = parser.parse_args(argv)
    figures = claim_stdout()
    steps, kill_step = (30, 15) if args.quick else (60, 25)
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as work:
        result = measure(Path(work), steps, kill_step)
    log(f"restarts: {result['restarts']}")
    ratio = result["bytes"] / (3 * result["params"] * 4)
    print(figure_line("checkpoint_bytes_over_composition_state", ratio, 1.1, "lower", bytes=result["bytes"],
                      composition_parameters=result["params"]), file=figures)
    print(figure_line("seconds_from_worker_kill_to_next_trained_step", result["recovery_s"], 60, "lower"),
          file=figures)
    print(figure_line("checkpoint_save_over_step_time", result["save_s"] / result["step_s"], 1.0, "lower",
                      save_s=round(result["save_s"], 4), step_s=round(result["step_s"], 4)), file=figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
