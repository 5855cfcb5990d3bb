"""The real CLI: `ray start` a head and two worker nodes, then `ray job submit` the tiny job."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.dist_helpers import free_port
from launcher.simulated_cluster import RAY_ENV

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.timeout(600)


def _ray(*args, env, timeout=120):
    ray_cli = str(Path(sys.executable).parent / "ray")
    return subprocess.run([ray_cli, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _start_nodes(env, root: str) -> str:
    port, dashboard = free_port(), free_port()
    head = _ray("start", "--head", "--node-ip-address=127.0.0.2", f"--port={port}", "--num-cpus=0",
                "--include-dashboard=true", "--dashboard-host=127.0.0.2", f"--dashboard-port={dashboard}",
                f"--temp-dir={root}/h", f"--dashboard-agent-listen-port={free_port()}",
                "--object-store-memory=100000000", env=env)
    assert head.returncode == 0, head.stderr[-2000:]
    for index in (3, 4):
        node = _ray("start", f"--address=127.0.0.2:{port}", f"--node-ip-address=127.0.0.{index}", "--num-cpus=1",
                    f"--temp-dir={root}/n{index}", f"--dashboard-agent-listen-port={free_port()}",
                    "--object-store-memory=100000000", env=env)
        assert node.returncode == 0, node.stderr[-2000:]
    return f"http://127.0.0.2:{dashboard}"


def test_ray_job_submit_runs_the_tiny_job(tmp_path):
    env = {**os.environ, **RAY_ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    root = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    try:
        dashboard = _start_nodes(env, root)
        submit = _ray("job", "submit", f"--address={dashboard}", "--working-dir", str(ROOT), "--",
                      "python", "-m", "launcher.train", "--config", "configs/tiny.yaml", "--set",
                      f"run.output_dir={tmp_path / 'runs'}", f"run.cache_dir={tmp_path / 'cache'}",
                      env=env, timeout=540)
        output = submit.stdout + submit.stderr
        assert "succeeded" in output, output[-4000:]
        run_dirs = list((tmp_path / "runs").iterdir())
        assert len(run_dirs) == 1
        results = json.loads((run_dirs[0] / "results.json").read_text())
        assert set(results) == {"m_A", "m_B", "calm", "calm_heldin_keys"}
        metrics = (run_dirs[0] / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == 10 and "anchor_wait_fraction" in metrics[0]
        summary = json.loads((run_dirs[0] / "run_summary.json").read_text())
        assert summary["placement"]["embedded"] is False
        assert len(set(summary["placement"]["nodes_by_rank"])) == 2  # one worker node each
    finally:
        _ray("stop", "--force", env=env)
        shutil.rmtree(root, ignore_errors=True)
