"""A simulated multi-node Ray cluster on one machine, for tests, benchmarks and trying a multi-node
config without a cluster. Each node gets its own loopback address (Ray rewrites 127.0.0.1 and would
hang) and the driver a short temp root (Ray's unix-socket paths must stay under 107 bytes)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "GLOO_SOCKET_IFNAME": "lo",
           "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "RAY_worker_niceness": "0"}


# A lost node is declared dead after a few seconds instead of ~30 s (slack enough for a busy 2-core host:
# a live node missing its checks would be declared dead for good).
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                   "health_check_timeout_ms": 3000, "health_check_failure_threshold": 3}


@contextlib.contextmanager
def simulated_cluster(nodes: list[dict], system_config: dict | None = None):
    """Head (no CPUs) + one node per entry of ``nodes`` (``{"num_cpus": 1, "resources": {...}}``),
    each on its own loopback address; the driver connects. Shut down on exit."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.update(RAY_ENV)
    root = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # unix-socket paths must stay short
    # Cluster writes the head's address to <RAY_TMPDIR>/ray/ray_current_cluster whatever the nodes' temp_dir;
    # on a machine where Ray never ran that directory does not exist. Keep it inside this cluster's root.
    previous_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = root
    os.makedirs(os.path.join(root, "ray"), exist_ok=True)
    head = {"num_cpus": 0, "node_ip_address": "127.0.0.2", "include_dashboard": False,
            "object_store_memory": 80 * 1024 * 1024, "temp_dir": os.path.join(root, "head")}
    if system_config:
        head["_system_config"] = system_config
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for index, node in enumerate(nodes):
            cluster.add_node(node_ip_address=f"127.0.0.{index + 3}", object_store_memory=80 * 1024 * 1024,
                             **node)
        ray.init(address=cluster.address, _node_ip_address="127.0.0.2")
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if previous_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous_tmpdir
        shutil.rmtree(root, ignore_errors=True)
