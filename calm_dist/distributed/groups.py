"""Process groups: the anchor ranks' world (DeepSpeed's) and a transport group over every rank.

DeepSpeed ZeRO-3 issues collectives on the default group (barriers, partitioning), so the default
group holds the anchor ranks only; activations travel on a separate point-to-point group that
also holds the augment stages. Both are built from one rendezvous store.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from calm_dist.distributed.topology import ANCHOR, Role, Topology


@dataclass
class Groups:
    topology: Topology
    rank: int
    role: Role
    transport: "dist.ProcessGroup"
    backend: str
    device: torch.device


def resolve_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def local_device(backend: str) -> torch.device:
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _point_to_point_group(backend: str, store, rank: int, size: int, timeout: datetime.timedelta):
    prefixed = dist.PrefixStore("calm/transport/", store)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, size, options)
    return dist.ProcessGroupGloo(prefixed, rank, size, timeout)


def init_groups(topology: Topology, rank: int, store, backend: str, timeout_s: int) -> Groups:
    """Every rank joins the transport group; anchor ranks also form the default (DeepSpeed) group."""
    backend = resolve_backend(backend)
    device = local_device(backend)
    timeout = datetime.timedelta(seconds=timeout_s)
    role = topology.role_of(rank)
    transport = _point_to_point_group(backend, store, rank, topology.world_size, timeout)
    if role.kind == ANCHOR and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.PrefixStore("calm/anchor/", store), rank=role.index,
                                world_size=topology.anchor_ranks, timeout=timeout)
        # DeepSpeed checks the launcher's variables against its group: they now describe the anchor world.
        os.environ.update(RANK=str(role.index), WORLD_SIZE=str(topology.anchor_ranks))
    return Groups(topology, rank, role, transport, backend, device)


def env_store(timeout_s: int):
    """The rendezvous store of a torchrun/Ray launch: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE."""
    store, rank, world_size = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=timeout_s)))
    return store, rank, world_size
