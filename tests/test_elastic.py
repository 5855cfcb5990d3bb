"""Elastic, fault-tolerant runs on a simulated multi-node Ray cluster: worker kill, node loss, resharding."""
import copy
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from calm_dist.checkpoint import CheckpointStore, checkpoint_name
from calm_dist.train.report import read_jsonl
from launcher.simulated_cluster import FAST_NODE_DEATH, simulated_cluster
from tests.user_project import generic_config

pytestmark = pytest.mark.timeout(420)
NODES = [{"num_cpus": 1, "resources": {"anchor": 1}}, {"num_cpus": 1, "resources": {"anchor": 1}},
         {"num_cpus": 1, "resources": {"augment": 1}}]
STEPS, EVERY = 40, 4


@pytest.fixture(scope="module")
def base_config(project, tmp_path_factory):
    return generic_config(project, tmp_path_factory.mktemp("elastic"), "run.launcher=ray", f"train.max_steps={STEPS}",
                          f"checkpoint.every_steps={EVERY}", "checkpoint.keep=2", "parallel.timeout_s=60",
                          "eval.every_steps=16", "parallel.anchor_ranks=2", "parallel.min_anchor_ranks=1",
                          "ray.anchor_resources={anchor: 1}",
                          "ray.augment_resources={augment: 1}", "ray.max_failures=2", "ray.placement_timeout_s=60")


def configured(config, **dotted):
    config = copy.deepcopy(config)
    for key, value in dotted.items():
        section, name = key.split("__")
        setattr(getattr(config, section), name, value)
    return config


def run_driver(config) -> Path:
    from launcher.ray_job import run_ray_job

    return run_ray_job(config)


def losses(run_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_jsonl(run_dir / "metrics.jsonl") if "loss" in record}


def steps_logged(run_dir: Path) -> int:
    return sum(1 for record in read_jsonl(run_dir / "metrics.jsonl") if "loss" in record)


def when_steps_logged(run_dir: Path, count: int, action, timeout_s: float = 180) -> threading.Thread:
    """Runs ``action()`` once metrics.jsonl holds ``count`` steps (a watcher thread)."""
    def watch():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if steps_logged(run_dir) >= count:
                action()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def sigkill_process_titled(title: str) -> int:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if title.encode() in handle.read():
                    os.kill(int(pid), signal.SIGKILL)
                    return int(pid)
        except OSError:
            continue
    raise AssertionError(f"no process titled {title}")


@pytest.fixture(scope="module")
def cluster():
    with simulated_cluster(NODES, FAST_NODE_DEATH) as running:
        yield running


@pytest.fixture(scope="module")
def reference(base_config, cluster):
    """An uninterrupted 2-anchor-rank run with the same seed."""
    return run_driver(configured(base_config, run__name="reference"))


def assert_continuous_and_equal(run_dir: Path, reference: Path, from_step: int = 1, steps: int = STEPS,
                                tolerance: float = 1e-5, until_step: int | None = None) -> None:
    got, expected = losses(run_dir), losses(reference)
    records = read_jsonl(run_dir / "metrics.jsonl")
    logged = [record["step"] for record in records if "loss" in record]
    assert logged == list(range(from_step, steps + 1))  # no step twice, none skipped
    evaluated = [record["step"] for record in records if "eval" in record]
    assert evaluated == sorted(set(evaluated)) and evaluated[-1] == steps  # each evaluation once
    worst = max(abs(got[step] - expected[step]) for step in got if until_step is None or step <= until_step)
    assert worst <= tolerance, f"largest loss difference to the uninterrupted run: {worst:.2e}"
    final = CheckpointStore(str(run_dir / "checkpoints")).latest()
    model_states = next((run_dir / "checkpoints" / final / "ds" / final).glob("*model_states.pt"))
    assert torch.load(model_states, weights_only=False)["global_steps"] == steps  # optimizer steps taken


def test_sigkill_of_an_anchor_worker_resumes_from_the_latest_checkpoint(base_config, cluster, reference):
    config = configured(base_config, run__name="sigkill")
    run_dir = Path(config.run.output_dir) / "sigkill"
    killed = []
    when_steps_logged(run_dir, 10, lambda: killed.append(sigkill_process_titled("AnchorRank1")))
    run_driver(config)
    assert killed, "the anchor worker was never killed"
    restarts = json.loads((run_dir / "run_summary.json").read_text())["restarts"]
    assert len(restarts) == 1 and restarts[0]["resumed_step"] % EVERY == 0 and restarts[0]["resumed_step"] >= 8
    assert_continuous_and_equal(run_dir, reference)
    store = CheckpointStore(str(run_dir / "checkpoints"))
    assert store.complete() == [checkpoint_name(STEPS - EVERY), checkpoint_name(STEPS)]  # checkpoint.keep=2
    assert (run_dir / "results.json").is_file()


def test_checkpoint_written_at_one_rank_resumes_at_two_with_the_same_losses(base_config, cluster, reference):
    one = configured(base_config, run__name="one_rank", parallel__anchor_ranks=1, checkpoint__keep=100)
    one_dir = run_driver(one)
    # The store as a crash right after step 20's checkpoint leaves it.
    two_dir = Path(base_config.run.output_dir) / "resharded"
    name = checkpoint_name(20)
    shutil.copytree(one_dir / "checkpoints" / name, two_dir / "checkpoints" / name)
    (two_dir / "checkpoints" / "latest").write_text(name)
    run_driver(configured(base_config, run__name="resharded", checkpoint__keep=100))
    assert (two_dir / "checkpoints" / name / "universal").is_dir()  # converted once, for 2 ranks
    assert len(json.loads((two_dir / "run_summary.json").read_text())["placement"]["nodes_by_rank"]) == 3
    assert_continuous_and_equal(two_dir, reference, from_step=21)


def test_resume_against_a_changed_base_model_is_refused(base_config, cluster, reference, tmp_path):
    from safetensors.torch import load_file, save_file

    summary = json.loads((reference / "run_summary.json").read_text())
    changed = tmp_path / "anchor"
    shutil.copytree(summary["base_models"]["anchor"]["path"], changed)
    weights = load_file(str(changed / "model.safetensors"))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 0.01
    save_file(weights, str(changed / "model.safetensors"))
    before = (reference / "metrics.jsonl").read_text()
    config = configured(base_config, run__name="reference", train__max_steps=STEPS + 8)
    config.anchor.model.path = str(changed)
    with pytest.raises(ValueError, match=r"anchor model .*sha256 .*Restore those weights"):
        run_driver(config)
    assert (reference / "metrics.jsonl").read_text() == before  # nothing ran


def test_export_of_the_latest_checkpoint_loads_in_one_process(reference, tmp_path):
    import calm_dist
    from launcher.export import main as export_main

    assert export_main(["--run", str(reference), "--out", str(tmp_path / "export")]) == 0
    model = calm_dist.load_exported(tmp_path / "export")
    from safetensors.torch import load_file

    final = load_file(str(reference / "export" / "composition.safetensors"))
    exported = model.composition_state_dict()
    assert exported.keys() == final.keys()
    for key, value in final.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0)
    ids = torch.tensor([[5, 6, 7]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, eos_token_id=None)
    assert out.shape == (1, 6)
    assert export_main(["--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2


def test_rerunning_a_finished_run_only_evaluates_its_last_checkpoint(base_config, cluster, reference):
    trained = [record for record in read_jsonl(reference / "metrics.jsonl") if "loss" in record]
    results = json.loads((reference / "results.json").read_text())
    assert run_driver(configured(base_config, run__name="reference")) == reference
    records = read_jsonl(reference / "metrics.jsonl")
    assert [record for record in records if "loss" in record] == trained  # no step trained again
    assert [record["step"] for record in records if "eval" in record] == [0, 16, 32, STEPS]
    again = json.loads((reference / "results.json").read_text())
    assert again["calm"] == pytest.approx(results["calm"], abs=1e-6)  # the same bridges, evaluated again
    notes = [e["message"] for e in read_jsonl(reference / "events.jsonl") if e["event"] == "note"]
    assert any(f"resuming from checkpoint {checkpoint_name(STEPS)}" in note for note in notes)


def test_past_max_failures_the_job_stops_naming_its_intact_latest_checkpoint(base_config, cluster):
    from calm_dist.checkpoint import consolidated_composition

    config = configured(base_config, run__name="gives_up", ray__max_failures=0)
    run_dir = Path(config.run.output_dir) / "gives_up"
    when_steps_logged(run_dir, 10, lambda: sigkill_process_titled("AnchorRank0"))
    with pytest.raises(RuntimeError, match=r"ray.max_failures=0.*anchor-rank-0 died.*Latest complete checkpoint: step_"):
        run_driver(config)
    store = CheckpointStore(str(run_dir / "checkpoints"))
    weights = consolidated_composition(store, store.latest())
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


# --- what a restart can fix, and what it cannot ---------------------------------------------------------

def _task_error(cause: Exception, role: str):
    from ray.exceptions import RayTaskError

    return RayTaskError("run", f"Traceback ...\n{type(cause).__name__}: {cause}", cause,
                        actor_repr=role).as_instanceof_cause()


GLOO_PEER_GONE = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                              "[127.0.0.4]:40111. This is typically caused by a remote worker crashing.")


def test_a_dead_worker_is_the_failure_even_when_its_peers_errors_come_first():
    from ray.exceptions import ActorDiedError

    from launcher.ray_driver import WorkerLost, classify_failure, is_loss

    failure = classify_failure({"augment-stage-0": _task_error(GLOO_PEER_GONE, "AugmentStage0"),
                                "anchor-rank-0": _task_error(GLOO_PEER_GONE, "AnchorRank0"),
                                "anchor-rank-1": ActorDiedError()})
    assert isinstance(failure, WorkerLost) and is_loss(failure)
    assert str(failure).startswith("anchor-rank-1 died: The actor died unexpectedly")


def test_an_error_of_worker_code_is_the_failure_not_its_peers_lost_connections():
    from launcher.ray_driver import classify_failure, is_loss

    bad_path = _task_error(FileNotFoundError(2, "No such file or directory", "/models/anchor/model.safetensors"),
                           "AnchorRank0")
    failure = classify_failure({"augment-stage-0": _task_error(GLOO_PEER_GONE, "AugmentStage0"),
                                "anchor-rank-0": bad_path})
    assert failure is bad_path and isinstance(failure, FileNotFoundError) and not is_loss(failure)
    data_error = _task_error(KeyError("position"), "AugmentStage0")
    assert classify_failure({"augment-stage-0": data_error}) is data_error
    assert not is_loss(classify_failure({"anchor-rank-0": _task_error(RuntimeError("DeepSpeed found no checkpoint"),
                                                                       "AnchorRank0")}))


def test_only_lost_connections_count_as_a_loss():
    from torch.distributed import DistNetworkError

    from launcher.ray_driver import WorkerLost, classify_failure

    failure = classify_failure({"anchor-rank-1": _task_error(DistNetworkError("failed to connect to the store"),
                                                             "AnchorRank1"),
                                "anchor-rank-0": _task_error(GLOO_PEER_GONE, "AnchorRank0")})
    assert isinstance(failure, WorkerLost) and "anchor-rank-1 lost its connection to its peers" in str(failure)


class NoteTaker:
    """The logger run_elastic reports to, keeping what it was told."""

    def __init__(self):
        self.reports, self.notes = [], []

    def __call__(self, report):
        self.reports.append(report)

    def note(self, message: str):
        self.notes.append(message)

    def resume_at(self, point, store, max_steps: int):
        pass


def _run_inputs(config):
    """The runtime's inputs of a prepared job (no run directory)."""
    from calm_dist.train.job import prepare_job
    from launcher.runtime import runtime_inputs

    return runtime_inputs(prepare_job(config, log=lambda _: None))


def _assert_stops_at_once_without_a_restart(config, inputs, error_type, match: str):
    from ray.exceptions import RayTaskError

    from launcher.elastic import run_elastic

    logger = NoteTaker()
    with pytest.raises(error_type, match=match) as raised:
        run_elastic(config, inputs, logger, None)
    assert isinstance(raised.value, RayTaskError)  # the worker's own error, with its traceback
    assert not [note for note in logger.notes if "worker failure" in note] and not logger.reports
    return raised.value


def test_a_bad_model_path_stops_the_job_at_once_without_spending_a_restart(base_config, cluster, tmp_path):
    config = configured(base_config, run__name="bad_path", ray__max_failures=3)
    import dataclasses

    inputs = _run_inputs(config)
    anchor = tmp_path / "anchor_without_weights"  # its config is there, so the driver's plan is made
    shutil.copytree(inputs.anchor_path, anchor, ignore=shutil.ignore_patterns("*.safetensors"))
    inputs = dataclasses.replace(inputs, anchor_path=str(anchor))
    _assert_stops_at_once_without_a_restart(config, inputs, OSError, "safetensors")


def test_a_data_error_before_the_first_step_stops_the_job_at_once(base_config, cluster, tmp_path):
    import dataclasses

    config = configured(base_config, run__name="bad_data", ray__max_failures=3)
    inputs = _run_inputs(config)
    damaged = tmp_path / "data"  # every Arrow shard cut in half: each rank's reader fails before step 1
    shutil.copytree(inputs.data.train, damaged)
    for shard in damaged.rglob("*.arrow"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    inputs = dataclasses.replace(inputs, data=dataclasses.replace(inputs.data, train=str(damaged)))
    _assert_stops_at_once_without_a_restart(config, inputs, Exception, None)
