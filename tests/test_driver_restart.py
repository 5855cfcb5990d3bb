"""SIGKILL of the driver itself mid-run: the same command again resumes from the latest checkpoint, and every
step appears exactly once, with the loss of an uninterrupted run (the single-process twin's, within 1e-4)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calm_dist.train.report import read_jsonl
from launcher.simulated_cluster import RAY_ENV

ROOT = Path(__file__).parent.parent
STEPS, EVERY = 20, 4


def command(project, root: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "launcher.train", "--config", "configs/example_composition.yaml", "--set",
            f"run.output_dir={root / 'runs'}", f"run.cache_dir={root / 'cache'}", f"run.name={name}",
            f"anchor.model.path={project.anchor}", f"augment.model.path={project.augment}",
            f"data.train={project.data('train.jsonl')}", f"data.eval={project.data('eval.jsonl')}",
            "data.max_length=64", f"train.max_steps={STEPS}", "train.batch_size=8", "train.lr=3.0e-3",
            "eval.batch_size=8", "eval.every_steps=10", f"checkpoint.every_steps={EVERY}"]


def environment() -> dict:
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return env


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.mark.timeout(900)
def test_a_killed_driver_resumes_with_the_same_command(project, tmp_path):
    reference = subprocess.run(command(project, tmp_path, "reference") + ["run.launcher=local"], cwd=ROOT,
                               env=environment(), capture_output=True, text=True, timeout=400)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = losses(tmp_path / "runs" / "reference")

    run_dir = tmp_path / "runs" / "killed"
    log = tmp_path / "killed-driver.log"
    with open(log, "w") as output:
        driver = subprocess.Popen(command(project, tmp_path, "killed"), cwd=ROOT, env=environment(), stdout=output,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    # Killed once the first checkpoint is published: the driver receives step reports in batches (every 0.5 s),
    # so on a fast machine a count of logged losses can first be seen when every step is done.
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "latest").exists() and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert driver.poll() is None, f"the driver finished before it could be killed: {log.read_text()[-3000:]}"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started (the embedded Ray)
    driver.wait()
    assert len(losses(run_dir)) < STEPS

    again = subprocess.run(command(project, tmp_path, "killed"), cwd=ROOT, env=environment(), capture_output=True,
                           text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from checkpoint step_0000000" in again.stdout + again.stderr
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))  # no step lost or doubled
    assert [r["step"] for r in records if "eval" in r] == [0, 10, 20]
    got = losses(run_dir)
    assert max(abs(got[step] - expected[step]) for step in expected) <= 1e-4
    assert json.loads((run_dir / "results.json").read_text())["calm"]["eval_loss"] == pytest.approx(
        json.loads((tmp_path / "runs" / "reference" / "results.json").read_text())["calm"]["eval_loss"], abs=1e-4)
