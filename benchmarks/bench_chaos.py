"""Chaos figures: one run on a simulated 3-node Ray cluster (2 anchor nodes, 1 augment node) loses an anchor
rank, the augment stage, then an anchor rank while a checkpoint is being written (SIGKILL each), and is
compared with the same run uninterrupted, side by side on the same cluster.

Run: ``python -m benchmarks.bench_chaos``. One JSON line per figure on stdout, logs on stderr.

Figures
1. chaos_step_records_over_steps: step records in metrics.jsonl / steps (1.0: every step exactly once).
2. chaos_losses_equal_fraction: share of steps whose loss is within 1e-5 of the uninterrupted run's.
3. chaos_recovery_seconds_<role>: seconds from each SIGKILL to the first step trained after the restart it
   caused (detection, teardown, re-placement, worker start, DeepSpeed init, checkpoint load, one step).
4. chaos_wall_time_over_uninterrupted: the chaos run's wall time / the uninterrupted run's.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks._common import claim_stdout, figure_line, log
from benchmarks.chaos import Chaos, unleash


def main() -> None:
    figures = claim_stdout()
    from launcher.simulated_cluster import FAST_NODE_DEATH, simulated_cluster
    from launcher.ray_job import run_ray_job
    from tests.test_chaos import KILLS, NODES, STEPS, chaos_config
    from tests.user_project import make_project

    root = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    project = make_project(root / "project")
    with simulated_cluster(NODES, FAST_NODE_DEATH):
        started = time.perf_counter()
        reference = run_ray_job(chaos_config(project, root, "reference"))
        reference_s = time.perf_counter() - started
        config = chaos_config(project, root, "chaos")
        chaos = Chaos(Path(config.run.output_dir) / "chaos", KILLS)
        killer = unleash(chaos, chaos.run_dir / "checkpoints")
        started = time.perf_counter()
        run_ray_job(config)
        chaos_s = time.perf_counter() - started
        killer.join(5)
    if chaos.error is not None:
        raise chaos.error
    records = chaos.step_records()
    expected = {r["step"]: r["loss"] for r in Chaos(reference, []).step_records()}
    equal = sum(abs(r["loss"] - expected[r["step"]]) <= 1e-5 for r in records) / STEPS
    log(f"kills: {[(d.kill.title, d.logged_steps, d.checkpoint) for d in chaos.done]}")
    print(figure_line("chaos_step_records_over_steps", len(records) / STEPS, 1.0, "lower",
                      steps=STEPS, kills=len(chaos.done)), file=figures)
    print(figure_line("chaos_losses_equal_fraction", equal, 1.0, "higher", tolerance=1e-5), file=figures)
    names = ["anchor_rank", "augment_stage", "anchor_rank_during_checkpoint"]
    for name, seconds, done in zip(names, chaos.recovery_seconds(), chaos.done, strict=True):
        print(figure_line(f"chaos_recovery_seconds_{name}", seconds, 60, "lower", killed=done.kill.title,
                          at_logged_step=done.logged_steps, checkpoint_being_written=done.checkpoint), file=figures)
    print(figure_line("chaos_wall_time_over_uninterrupted", chaos_s / reference_s, 2.0, "lower",
                      chaos_s=round(chaos_s, 1), uninterrupted_s=round(reference_s, 1)), file=figures)


if __name__ == "__main__":
    main()
