"""Chaos: three workers of different roles SIGKILLed at steps of one run — an anchor rank, an augment stage,
then an anchor rank while a checkpoint is being written. The job finishes by itself, every step appears
exactly once in metrics.jsonl, and every loss equals the uninterrupted run's."""
import json
from pathlib import Path

import pytest

from benchmarks.chaos import Chaos, Kill, unleash
from launcher.simulated_cluster import FAST_NODE_DEATH, simulated_cluster
from tests.user_project import generic_config

pytestmark = pytest.mark.timeout(900)
NODES = [{"num_cpus": 1, "resources": {"anchor": 1}}, {"num_cpus": 1, "resources": {"anchor": 1}},
         {"num_cpus": 1, "resources": {"augment": 1}}]
STEPS, EVERY = 40, 4
KILLS = [Kill("AnchorRank1", after_step=6), Kill("AugmentStage0", after_step=15),
         Kill("AnchorRank0", after_step=24, during_checkpoint=True)]


def chaos_config(project, root: Path, name: str):
    return generic_config(project, root, "run.launcher=ray", f"run.name={name}", f"train.max_steps={STEPS}",
                          f"checkpoint.every_steps={EVERY}", "checkpoint.keep=2", "eval.every_steps=20",
                          "parallel.timeout_s=60", "parallel.anchor_ranks=2", "ray.anchor_resources={anchor: 1}",
                          "ray.augment_resources={augment: 1}", "ray.max_failures=3", "ray.placement_timeout_s=60")


def test_three_kills_of_different_roles_leave_the_run_exact(project, tmp_path):
    from launcher.ray_job import run_ray_job

    with simulated_cluster(NODES, FAST_NODE_DEATH):
        reference = run_ray_job(chaos_config(project, tmp_path, "reference"))
        config = chaos_config(project, tmp_path, "chaos")
        chaos = Chaos(Path(config.run.output_dir) / "chaos", KILLS)
        killer = unleash(chaos, chaos.run_dir / "checkpoints")
        run_dir = run_ray_job(config)
        killer.join(5)
    assert chaos.error is None, chaos.error
    assert [record.kill for record in chaos.done] == KILLS and chaos.done[-1].checkpoint is not None
    records = chaos.step_records()
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # every step exactly once
    expected = {r["step"]: r["loss"] for r in Chaos(reference, []).step_records()}
    worst = max(abs(r["loss"] - expected[r["step"]]) for r in records)
    assert worst <= 1e-5, f"largest loss difference to the uninterrupted run: {worst:.2e}"
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert len(summary["restarts"]) == 3 and all(r["anchor_ranks"] == 2 for r in summary["restarts"])
    assert len(chaos.restarts_seen()) == 3  # one restart per kill, each a lost process (no deterministic error)
    evaluations = [(r["step"], r["eval"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                   if "eval" in r]
    assert evaluations == [(0, "eval"), (20, "eval"), (40, "eval")]
    print("seconds from each kill to the next trained step:", [round(s, 1) for s in chaos.recovery_seconds()])
