"""The default path of `python -m launcher.train`: no RAY_ADDRESS, so an embedded local Ray, reachable from
this machine only."""
import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launcher.simulated_cluster import RAY_ENV

ROOT = Path(__file__).parent.parent


def listening_sockets(root: psutil.Process) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket listening in ``root`` or its descendants."""
    try:
        processes = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for connection in psutil.net_connections(kind="inet"):
        if connection.status == psutil.CONN_LISTEN and connection.pid in processes:
            try:
                name = processes[connection.pid].name()
            except psutil.NoSuchProcess:
                name = "?"
            found.add((connection.laddr.ip, connection.laddr.port, name))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


@pytest.mark.timeout(600)
def test_cli_runs_the_job_on_an_embedded_ray_listening_on_loopback_only(project, tmp_path):
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    env.pop("GLOO_SOCKET_IFNAME", None)  # the embedded Ray must keep gloo on loopback by itself
    command = [sys.executable, "-m", "launcher.train", "--config", "configs/example_composition.yaml", "--set",
               f"run.output_dir={tmp_path / 'runs'}", f"run.cache_dir={tmp_path / 'cache'}",
               f"anchor.model.path={project.anchor}", f"augment.model.path={project.augment}",
               f"data.train={project.data('train.jsonl')}", f"data.eval={project.data('eval.jsonl')}",
               "data.max_length=64", "train.max_steps=10", "train.batch_size=8", "eval.batch_size=8"]
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
        listening = set()
        try:
            deadline = time.monotonic() + 560
            while job.poll() is None and time.monotonic() < deadline:  # sampled while the job runs
                listening |= listening_sockets(psutil.Process(job.pid))
                time.sleep(0.5)
        finally:
            if job.poll() is None:
                job.kill()
            job.wait(timeout=60)
    assert job.returncode == 0, (tmp_path / "stderr").read_text()[-3000:]
    ray_processes = {name for _, _, name in listening}
    assert {"gcs_server", "raylet"} <= ray_processes, listening  # the check saw Ray's servers
    exposed = sorted(socket for socket in listening if not is_loopback(socket[0]))
    assert not exposed, f"listening beyond loopback: {exposed}"

    run_dir = Path((tmp_path / "stdout").read_text().strip().splitlines()[-1])
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["placement"]["embedded"] is True and len(summary["placement"]["nodes_by_rank"]) == 2
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 11))
    assert all({"loss", "tokens_per_s", "anchor_wait_fraction"} <= set(m) for m in steps)
    assert [m["step"] for m in metrics if "eval" in m] == [0, 10]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["calm"]["eval_loss"] < results["anchor"]["eval_loss"]
    output = (tmp_path / "stdout").read_text() + (tmp_path / "stderr").read_text()
    assert "FutureWarning" not in output and "is deprecated" not in output  # library chatter stays out
