"""Worker functions run by the multi-process tests (importable by spawned processes)."""
from __future__ import annotations

import torch

from calm_dist.distributed.groups import env_store
from calm_dist.distributed.worker import RunInputs, run_worker


def composition_run(rank: int, world_size: int, inputs: RunInputs) -> dict:
    """Trains the composition; anchor ranks return their losses and the gathered bridge weights."""
    import deepspeed

    store, _, _ = env_store(inputs.config.parallel.timeout_s)
    result = run_worker(inputs, rank, world_size, store)
    if "model" not in result:
        return {"role": result["role"], "bytes_sent": result["bytes_sent"]}
    model = result["model"]
    with deepspeed.zero.GatheredParameters(list(model.bridges.parameters())):
        bridges = {name: tensor.detach().clone() for name, tensor in model.composition_state_dict().items()}
    return {"role": result["role"], "losses": result["losses"], "bridges": bridges}


def failing_run(rank: int, world_size: int, inputs: RunInputs, failing_rank: int) -> dict:
    if rank == failing_rank:
        raise RuntimeError(f"injected failure on rank {rank}")
    return composition_run(rank, world_size, inputs)
