"""The default job's pipeline end to end through the real CLI, on the seconds-long tiny config."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.timeout(600)


def run_cli(*overrides, cwd=ROOT):
    command = [sys.executable, "-m", "launcher.train", "--config", "configs/tiny.yaml", "--set", "run.launcher=local",
               *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=500)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("job")
    overrides = (f"run.cache_dir={base / 'cache'}", f"run.output_dir={base / 'runs'}")
    first = run_cli(*overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(*overrides)
    assert second.returncode == 0, second.stderr[-3000:]
    return base, first, second


def test_last_line_is_the_run_directory(tiny_run):
    base, first, _ = tiny_run
    run_dir = Path(first.stdout.strip().splitlines()[-1])
    assert run_dir.is_dir() and run_dir.parent == (base / "runs").resolve()


def test_run_directory_contents(tiny_run):
    _, first, _ = tiny_run
    run_dir = Path(first.stdout.strip().splitlines()[-1])
    results = json.loads((run_dir / "results.json").read_text())
    tasks = {"kv_substitution", "numeric_arithmetic", "kv_arithmetic"}
    for row in ("m_A", "m_B", "calm"):
        assert set(results[row]) == tasks
        assert all(0.0 <= value <= 100.0 for value in results[row].values())
    assert set(results["calm_heldin_keys"]) == {"kv_arithmetic"}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 11))  # tiny.yaml: train.max_steps = 10
    assert all(isinstance(m["loss"], float) for m in metrics)
    assert any((run_dir / "tensorboard").iterdir())
    assert (run_dir / "loss_curves.png").stat().st_size > 1000
    assert (run_dir / "composition.pt").is_file()
    assert "m_A (augment)" in first.stdout and "CALM m_A+m_B" in first.stdout


def test_second_run_reuses_cached_data_and_base_models(tiny_run):
    _, first, second = tiny_run
    dirs = []
    for output in (first, second):
        run_dir = Path(output.stdout.strip().splitlines()[-1])
        summary = json.loads((run_dir / "run_summary.json").read_text())
        dirs.append({side: info["path"] for side, info in summary["base_models"].items()})
    assert dirs[0] == dirs[1]
    assert "pretrain" not in second.stderr  # no progress bar of base-model training the second time


def test_bad_override_fails_before_anything_runs(tmp_path):
    result = run_cli("train.max_stepz=3", f"run.output_dir={tmp_path}")
    assert result.returncode == 2
    assert "train.max_stepz" in result.stderr
    assert not any(tmp_path.iterdir())
