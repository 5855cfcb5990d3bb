"""Running distributed workers in local processes for tests: every rank fails together, nothing hangs."""
from __future__ import annotations

import faulthandler
import os
import socket
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from calm_dist.distributed.groups import end_rank_process, leave_process_groups


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, target, args, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    faulthandler.enable((Path(out_dir) / f"rank{rank}.fault").open("w"), all_threads=True)
    try:
        result = target(rank, world_size, *args)
    except BaseException:
        (Path(out_dir) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    leave_process_groups()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    end_rank_process()


def _first_cause(out_dir: Path, world_size: int) -> str | None:
    """The traceback of the rank that failed first in substance: a peer's lost connection is a consequence."""
    errors = [(out_dir / f"rank{rank}.error") for rank in range(world_size)]
    texts = [path.read_text() for path in errors if path.is_file()]
    causes = [text for text in texts if "Connection closed by peer" not in text and "Connection reset" not in text]
    return (causes or texts or [None])[0]


def spawn(target, world_size: int, args: tuple, out_dir: Path) -> list:
    """Runs ``target(rank, world_size, *args)`` in ``world_size`` processes; returns each rank's result.

    If any rank raises, the others are terminated and the error is re-raised here.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        mp.spawn(_entry, args=(world_size, free_port(), target, args, str(out_dir)), nprocs=world_size, join=True)
    except mp.ProcessRaisedException as error:
        cause = _first_cause(out_dir, world_size)
        raise RuntimeError(f"a rank failed; the first cause:\n{cause}") if cause else error
    except mp.ProcessExitedException as error:  # killed by a signal: the stacks faulthandler wrote, if any
        stacks = (out_dir / f"rank{error.error_index}.fault").read_text()
        raise RuntimeError(f"{error}; its threads' Python stacks:\n{stacks or '(none written)'}") from error
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
