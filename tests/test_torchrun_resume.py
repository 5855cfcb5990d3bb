"""The torchrun launch path: 2 anchor ranks + 1 augment stage per augmenting model match the single-process
run, write the same checkpoints, and a relaunch resumes from the latest one; plain and with activation
checkpointing. Two augmenting models: one reads the anchor's tokens, one its own tokenizer (chunks of 2
characters, whose tokens straddle the BPE anchor's), so both paths run under real torchrun in one launch."""
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
from tests.user_project import save_own_tokenizer_augment

REPO_ROOT = Path(__file__).resolve().parents[1]


def settings(project, root: Path, *extra: str) -> list[str]:
    return [*extra, f"run.cache_dir={root / 'cache'}", f"run.output_dir={root / 'runs'}", "run.name=resumable",
            f"anchor.model.path={project.anchor}",
            f"augment=[{{model: {{path: {project.augment}}}}}, {{model: {{path: {own_tokenizer_augment(project)}}}, "
            "connections: [[1, 0], [2, 2]]}]",
            f"data.train={project.data('train.jsonl')}", f"data.eval={project.data('eval.jsonl')}",
            "data.max_length=64", "train.max_steps=6", "train.batch_size=8", "train.lr=3.0e-3", "train.warmup_steps=1",
            "eval.every_steps=3", "eval.batch_size=8", "checkpoint.every_steps=2", "checkpoint.keep=5",
            "parallel.timeout_s=120"]


def own_tokenizer_augment(project) -> Path:
    return save_own_tokenizer_augment(project, 2, False)


def torchrun(project, root: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
               str(free_port()), "-m", "launcher.train", "--config", "configs/example_composition.yaml", "--set",
               *settings(project, root, *extra), "parallel.anchor_ranks=2", "parallel.augment_stages=1"]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)


def by_step(records: list[dict]) -> tuple[dict, dict]:
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    evaluations = {r["step"]: r["eval_loss"] for r in records if "eval" in r}
    return losses, evaluations


@pytest.mark.timeout(900)
@pytest.mark.parametrize("extra", [(), ("deepspeed.activation_checkpointing=true",)], ids=["plain", "checkpointing"])
def test_torchrun_matches_one_process_and_a_relaunch_resumes(project, tmp_path, extra):
    from launcher.train import main

    assert main(["--config", "configs/example_composition.yaml", "--set",
                 *settings(project, tmp_path / "local", *extra), "run.launcher=local", "checkpoint.every_steps=0"]) == 0
    local_dir = next((tmp_path / "local" / "runs").iterdir())
    local_losses, local_evals = by_step(read_jsonl(local_dir / "metrics.jsonl"))

    first = torchrun(project, tmp_path, *extra)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "resumable"
    assert first.stdout.strip().splitlines()[-1] == str(run_dir.resolve())
    losses, evaluations = by_step(read_jsonl(run_dir / "metrics.jsonl"))
    print(f"torchrun (2 anchor ranks + 1 stage per augmenting model, one with its own tokenizer): max |torchrun - "
          f"local| loss over {len(local_losses)} steps: "
          f"{max(abs(losses[step] - local_losses[step]) for step in local_losses):.2e}")
    assert len(local_losses) == 6 and max(abs(losses[step] - local_losses[step]) for step in local_losses) <= 1e-4
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["augment_tokenizers"] == [None, str(own_tokenizer_augment(project))]  # None: the anchor's ids
    assert set(evaluations) == set(local_evals) == {0, 3, 6}
    assert max(abs(evaluations[step] - local_evals[step]) for step in local_evals) <= 1e-5

    # The store as a crash right after step 4's checkpoint leaves it.
    shutil.rmtree(run_dir / "checkpoints" / checkpoint_name(6))
    (run_dir / "checkpoints" / "latest").write_text(checkpoint_name(4))
    second = torchrun(project, tmp_path, *extra)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from checkpoint {checkpoint_name(4)}" in second.stdout + second.stderr
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert [r["step"] for r in records if "eval" in r] == [0, 3, 6]
    resumed_losses, _ = by_step(records)
    assert max(abs(resumed_losses[step] - losses[step]) for step in losses) <= 1e-5
    assert json.loads((run_dir / "results.json").read_text())["calm"]["eval_loss"] == pytest.approx(
        evaluations[6], abs=1e-5)
