"""DeepSpeed on the CPU accelerator, as an anchor rank sets it up."""
import pytest


def _count_device_queries(rank: int, world: int, local_world_size: str | None) -> dict:
    import os

    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import numa

    from calm_dist.distributed.zero_anchor import init_deepspeed

    if local_world_size is not None:
        os.environ["LOCAL_WORLD_SIZE"] = local_world_size
    dist.init_process_group("gloo")
    init_deepspeed("gloo")
    spawned = []
    original = numa.subprocess.check_output
    numa.subprocess.check_output = lambda *args, **kwargs: spawned.append(args) or original(*args, **kwargs)
    try:
        counts = [get_accelerator().device_count() for _ in range(3)]
    finally:
        numa.subprocess.check_output = original
    return {"counts": counts, "subprocesses": len(spawned)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("local_world_size, expected", [(None, 1), ("2", 2)])
def test_the_cpu_accelerator_counts_devices_without_a_subprocess(tmp_path, local_world_size, expected):
    """ZeRO-3 asks the accelerator for its device count on every gradient reduce; on CPU that ran
    ``numactl --hardware`` each time until LOCAL_SIZE was set (here: 1 per call)."""
    from tests.dist_helpers import spawn

    (result,) = spawn(_count_device_queries, 1, (local_world_size,), tmp_path / "ranks")
    assert result == {"counts": [expected] * 3, "subprocesses": 0}
