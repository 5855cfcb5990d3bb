"""The torchrun launch path writes the same checkpoints and a relaunch resumes from the latest one."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from calm_dist.checkpoint import checkpoint_name
from calm_dist.train.report import read_jsonl
from tests.dist_helpers import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]


def torchrun(tmp_path: Path) -> subprocess.CompletedProcess:
    overrides = [f"run.cache_dir={tmp_path / 'cache'}", f"run.output_dir={tmp_path / 'runs'}", "run.name=resumable",
                 "train.max_steps=6", "train.batch_size=8", "checkpoint.every_steps=2", "checkpoint.keep=5",
                 "parallel.anchor_ranks=1", "parallel.augment_stages=1", "parallel.timeout_s=60"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "launcher.train", "--config", "configs/tiny.yaml", "--set", *overrides]
    env = dict(os.environ, DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=280)


@pytest.mark.timeout(600)
def test_torchrun_relaunch_resumes_from_the_latest_checkpoint(tmp_path):
    first = torchrun(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "resumable"
    assert first.stdout.strip().splitlines()[-1] == str(run_dir.resolve())
    uninterrupted = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}
    # The store as a crash right after step 4's checkpoint leaves it.
    shutil.rmtree(run_dir / "checkpoints" / checkpoint_name(6))
    (run_dir / "checkpoints" / "latest").write_text(checkpoint_name(4))
    second = torchrun(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from checkpoint {checkpoint_name(4)}" in second.stdout + second.stderr
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert max(abs(r["loss"] - uninterrupted[r["step"]]) for r in records) <= 1e-5
    assert json.loads((run_dir / "results.json").read_text())
