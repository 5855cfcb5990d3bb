"""Process groups: the anchor ranks' world (DeepSpeed's) and a transport group over every rank.

DeepSpeed ZeRO-3 issues collectives on the default group (barriers, partitioning), so the default
group holds the anchor ranks only; activations travel on a separate point-to-point group that
also holds the augment stages. Both are built from one rendezvous store.
"""
from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import NoReturn

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

    def close_transport(self) -> None:
        """Once this rank's role is done: waits until every rank is done with the transport group (so
        none closes a connection a peer still reads), then shuts the group down."""
        self.transport.barrier().wait()
        self.transport.shutdown()


def leave_process_groups() -> None:
    """Destroys every process group this process still holds (the anchor ranks' default group, which
    DeepSpeed uses, and any group made from it). Call it once the process needs no more collectives.

    Left to interpreter exit, gloo's threads can still be finishing work that holds Python objects; one
    that then takes the GIL of a finalizing interpreter is ended by Python mid-C++ and the process
    aborts ("terminate called without an active exception", pytorch/pytorch#190489).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_rank_process(exit_code: int = 0) -> NoReturn:
    """Ends a rank's process once everything it produces is written, without interpreter finalization.

    ``leave_process_groups`` cannot free the groups other objects still hold (DeepSpeed's, the transport
    group), so their gloo threads live on; one still finishing a last operation when the interpreter
    finalizes aborts a process whose job succeeded (the same pytorch/pytorch#190489).
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


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
    """The rendezvous store of a torchrun/Ray launch: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE.

    With a loopback MASTER_ADDR (one machine, e.g. the embedded Ray) rank 0 hosts the store on that
    address alone; torch's own store would listen on every interface.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    address, rank = os.environ.get("MASTER_ADDR", ""), os.environ.get("RANK")
    if rank == "0" and _is_loopback(address) and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        world_size = int(os.environ["WORLD_SIZE"])
        return _store_on(address, int(os.environ["MASTER_PORT"]), world_size, timeout), 0, world_size
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    return store, rank, world_size


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name
        return False


def _store_on(address: str, port: int, world_size: int, timeout: datetime.timedelta) -> "dist.TCPStore":
    """The master TCPStore listening on ``address`` only (a socket bound here, handed to the store)."""
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((address, port))
        listener.listen(max(world_size, 1) * 2)
    except OSError:
        listener.close()
        raise
    descriptor = listener.detach()  # the store owns it from here on
    try:
        return dist.TCPStore(address, port, world_size, True, timeout, master_listen_fd=descriptor)
    except BaseException:
        os.close(descriptor)
        raise
