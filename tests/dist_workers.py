"""Worker functions run by the multi-process tests (importable by spawned processes)."""
from __future__ import annotations

import re

import torch

from calm_dist.distributed.groups import env_store
from calm_dist.distributed.worker import RunInputs, run_worker


def composition_run(rank: int, world_size: int, inputs: RunInputs) -> dict:
    """Trains the composition; anchor ranks return their losses, reports and the gathered bridge weights."""
    from calm_dist.distributed.zero_anchor import gathered_composition_state

    store, _, _ = env_store(inputs.parallel.timeout_s)
    reports = []
    result = run_worker(inputs, rank, world_size, store, on_report=reports.append)
    if "model" not in result:
        return {"role": result["role"], "bytes_sent": result["bytes_sent"]}
    return {"role": result["role"], "losses": result["losses"], "reports": reports,
            "bridges": gathered_composition_state(result["model"])}


def token_loss_run(rank: int, world_size: int, inputs: RunInputs) -> dict:
    """composition_run whose anchor ranks also return, for every evaluation batch in order, each real row's
    per-token losses: ``[(k, loss of predicting token k), ...]`` per row."""
    import torch.nn.functional as F

    import calm_dist.model.composed as composed

    original, records = composed.token_statistics, []

    def recording(logits, labels, positions, row_weight=None):
        statistics = original(logits, labels, positions, row_weight)
        if row_weight is not None:  # an evaluation batch
            losses = F.cross_entropy(logits.detach().float(), labels[:, 1:][positions[:, :-1]], reduction="none")
            per_row: dict[int, list] = {}
            for (row, position), loss in zip(positions.nonzero().tolist(), losses.tolist()):
                per_row.setdefault(row, []).append((position + 1, loss))
            records.append([per_row.get(row, []) for row in range(labels.shape[0]) if row_weight[row]])
        return statistics

    composed.token_statistics = recording
    return {**composition_run(rank, world_size, inputs), "token_losses": records}


def activation_checkpointing_run(rank: int, world_size: int, inputs: RunInputs) -> dict:
    """composition_run whose anchor ranks also count the anchor layer calls run under activation checkpointing."""
    import calm_dist.model.wrapped_layer as wrapped

    original, calls = wrapped.checkpoint, []

    def counting(function, *args, **kwargs):
        calls.append(1)
        return original(function, *args, **kwargs)

    wrapped.checkpoint = counting
    return {**composition_run(rank, world_size, inputs), "checkpointed_calls": len(calls)}


def killed_while_checkpointing(rank: int, world_size: int, inputs: RunInputs, kill_step: int,
                               killed_anchor_rank: int | None = None) -> dict:
    """composition_run whose anchor rank (``killed_anchor_rank``, or every one) dies by SIGKILL in the middle
    of uploading its files for ``kill_step``: its first file is stored, the second is cut off halfway."""
    import os
    import signal

    import torch.distributed as dist

    from calm_dist.checkpoint import CheckpointStore, checkpoint_name

    upload_file = CheckpointStore._upload_file
    stored = []

    def dying_upload_file(self, source, target):
        if f"/{checkpoint_name(kill_step)}/" in target and killed_anchor_rank in (None, dist.get_rank()):
            if stored:
                data = source.read_bytes()
                with self.fs.open_output_stream(target) as out:
                    out.write(data[:len(data) // 2])
                    out.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            stored.append(target)
        return upload_file(self, source, target)

    CheckpointStore._upload_file = dying_upload_file
    return composition_run(rank, world_size, inputs)


def failing_run(rank: int, world_size: int, inputs: RunInputs, failing_rank: int) -> dict:
    if rank == failing_rank:
        raise RuntimeError(f"injected failure on rank {rank}")
    return composition_run(rank, world_size, inputs)


def aborting_run(rank: int, world_size: int, inputs: RunInputs, aborting_rank: int) -> dict:
    """composition_run, but ``aborting_rank`` dies by SIGABRT in native code before it starts: no Python error."""
    if rank == aborting_rank:
        import os

        os.abort()
    return composition_run(rank, world_size, inputs)


def partition_facts(rank: int, world_size: int, inputs: RunInputs) -> dict:
    """Anchor-side facts after training: partition sizes, optimizer state, gathered anchor weights."""
    import deepspeed

    from calm_dist.distributed.zero_anchor import optimizer_state_numel

    store, _, _ = env_store(inputs.parallel.timeout_s)
    result = run_worker(inputs, rank, world_size, store)
    if "model" not in result:
        return {"role": result["role"]}
    model = result["model"]
    partitions = {name: (p.ds_tensor.numel(), p.ds_numel) for name, p in model.anchor.named_parameters()}
    with deepspeed.zero.GatheredParameters(list(model.anchor.parameters())):  # names as in the checkpoint
        weights = {re.sub(r"(layers\.\d+)\.layer\.", r"\1.", name): p.detach().clone()
                   for name, p in model.anchor.named_parameters()}
    pieces: dict[str, list[torch.Tensor]] = {}
    for name in sorted((n for n in weights if ".pieces." in n), key=lambda n: int(n.split(".pieces.")[1].split(".")[0])):
        pieces.setdefault(re.sub(r"\.pieces\.\d+", "", name), []).append(weights.pop(name))
    weights.update({name: torch.cat(rows) for name, rows in pieces.items()})  # vocabulary pieces joined
    bridge_numel = sum(p.ds_numel for p in model.bridges.parameters())
    bridge_partition_numel = sum(p.ds_tensor.numel() for p in model.bridges.parameters())
    return {"role": result["role"], "partitions": partitions, "weights": weights, "bridge_numel": bridge_numel,
            "bridge_partition_numel": bridge_partition_numel,
            "bridge_linear_classes": {type(m).__name__ for m in model.bridges.modules() if isinstance(m, torch.nn.Linear)},
            "optimizer_numel": optimizer_state_numel(result["optimizer"])}
