"""Losing a whole node of a simulated cluster: the job continues on the anchor rank that is left, and grows
back to two when a node returns. A cluster of its own (nodes come and go), hence a module of its own."""
import json
import threading
import time
from pathlib import Path

import pytest

from calm_dist.train.report import read_jsonl
from launcher.simulated_cluster import FAST_NODE_DEATH, simulated_cluster
from tests.test_elastic import NODES, assert_continuous_and_equal, base_config, configured, run_driver, when_steps_logged

pytestmark = pytest.mark.timeout(420)
__all__ = ["base_config"]  # the shared module fixture
STEPS = 300  # long enough at one rank for a node to rejoin


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_losing_a_node_continues_on_one_anchor_rank_and_grows_back(base_config):
    with simulated_cluster(NODES, FAST_NODE_DEATH) as cluster:
        reference = run_driver(configured(base_config, run__name="reference", train__max_steps=STEPS, eval__every_steps=0))
        config = configured(base_config, run__name="node_loss", train__max_steps=STEPS, eval__every_steps=0)
        run_dir = Path(config.run.output_dir) / "node_loss"
        reached = threading.Event()
        when_steps_logged(run_dir, 10, reached.set)
        outcome = {}

        def drive():
            try:
                outcome["run_dir"] = run_driver(config)
            except BaseException as error:  # reported by the main thread
                outcome["error"] = error

        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        assert reached.wait(180), "training never reached step 10"
        # The first {"anchor": 1} node (worker_nodes is a set: pick it by its address).
        cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_ip_address == "127.0.0.3"))
        on_one_rank = lambda: any(r.get("anchor_ranks") == 1 for r in read_jsonl(run_dir / "metrics.jsonl"))  # noqa: E731
        wait_for(lambda: on_one_rank() or not driver.is_alive(), 120, "training on one anchor rank")
        cluster.add_node(node_ip_address="127.0.0.9", object_store_memory=80 * 1024 * 1024, **NODES[0])
        driver.join(300)
        if "error" in outcome:
            pytest.fail(f"the driver failed: {outcome['error']}")
        assert outcome.get("run_dir") == run_dir
    summary = json.loads((run_dir / "run_summary.json").read_text())
    ranks_by_step = [record["anchor_ranks"] for record in read_jsonl(run_dir / "metrics.jsonl") if "loss" in record]
    assert 1 in ranks_by_step and ranks_by_step[-1] == 2
    assert [r["anchor_ranks"] for r in summary["restarts"]] == [1, 2] and summary["restarts"][1]["reason"] == "grow back"
    assert len(summary["placement"]["nodes_by_rank"]) == 3
    # One rank sums in another order than two: equal to float precision at first (the resharding tests
    # hold 1e-5), then the difference grows with the steps trained at the other count.
    shrunk_at = ranks_by_step.index(1) + 1
    assert_continuous_and_equal(run_dir, reference, steps=STEPS, tolerance=1e-5, until_step=shrunk_at - 1)
    assert_continuous_and_equal(run_dir, reference, steps=STEPS, tolerance=2e-3)
