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


def _submit(dashboard: str, env, project, *settings: str):
    return _ray("job", "submit", f"--address={dashboard}", "--working-dir", str(ROOT), "--",
                "python", "-m", "launcher.train", "--config", "configs/example_composition.yaml", "--set",
                f"anchor.model.path={project.anchor}", f"augment.model.path={project.augment}",
                f"data.train={project.data('train.jsonl')}", f"data.eval={project.data('eval.jsonl')}",
                "data.max_length=64", "train.max_steps=10", "train.batch_size=8", "eval.batch_size=8", *settings,
                env=env, timeout=540)


def test_ray_job_submit_runs_the_job_as_the_readme_writes_it(project):
    """No path overrides: the driver resolves every relative path (the data cache, the run directory) to
    one absolute path, which every node of this one-machine cluster sees; on separate machines a node that
    does not see one refuses the job before any training (test_ray_cluster checks that refusal)."""
    env = {**os.environ, **RAY_ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    root = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    try:
        dashboard = _start_nodes(env, root)
        submitted = _submit(dashboard, env, project)
        output = submitted.stdout + submitted.stderr
        assert "succeeded" in output, output[-4000:]
        run_dir = Path(next(line for line in reversed(submitted.stdout.splitlines()) if "/runs/my-composition" in line))
        results = json.loads((run_dir / "results.json").read_text())
        assert set(results) == {"anchor", "calm"}
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len([m for m in metrics if "loss" in m]) == 10 and "anchor_wait_fraction" in metrics[1]
        summary = json.loads((run_dir / "run_summary.json").read_text())
        assert summary["placement"]["embedded"] is False
        assert len(set(summary["placement"]["nodes_by_rank"])) == 2  # one worker node each
    finally:
        _ray("stop", "--force", env=env)
        shutil.rmtree(root, ignore_errors=True)
