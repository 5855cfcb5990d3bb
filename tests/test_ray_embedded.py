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
def test_cli_runs_the_tiny_job_on_an_embedded_ray(tmp_path):
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "launcher.train", "--config", "configs/tiny.yaml", "--set",
               f"run.output_dir={tmp_path / 'runs'}", f"run.cache_dir={tmp_path / 'cache'}"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=560)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["placement"]["embedded"] is True and len(summary["placement"]["nodes_by_rank"]) == 2
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert all({"loss", "tokens_per_s", "anchor_wait_fraction"} <= set(m) for m in metrics)
    assert json.loads((run_dir / "results.json").read_text())["calm"]
