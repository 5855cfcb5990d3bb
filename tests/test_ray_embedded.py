"""The default path of `python -m launcher.train`: no RAY_ADDRESS, so an embedded local Ray."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.simulated_cluster import RAY_ENV

ROOT = Path(__file__).parent.parent


@pytest.mark.timeout(600)
def test_cli_runs_the_job_on_an_embedded_ray(project, tmp_path):
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "launcher.train", "--config", "configs/example_composition.yaml", "--set",
               f"run.output_dir={tmp_path / 'runs'}", f"run.cache_dir={tmp_path / 'cache'}",
               f"anchor.model.path={project.anchor}", f"augment.model.path={project.augment}",
               f"data.train={project.data('train.jsonl')}", f"data.eval={project.data('eval.jsonl')}",
               "data.max_length=64", "train.max_steps=10", "train.batch_size=8", "eval.batch_size=8"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=560)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["placement"]["embedded"] is True and len(summary["placement"]["nodes_by_rank"]) == 2
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 11))
    assert all({"loss", "tokens_per_s", "anchor_wait_fraction"} <= set(m) for m in steps)
    assert [m["step"] for m in metrics if "eval" in m] == [0, 10]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["calm"]["eval_loss"] < results["anchor"]["eval_loss"]
    output = result.stdout + result.stderr
    assert "FutureWarning" not in output and "is deprecated" not in output  # library chatter stays out
