"""Chaos on a simulated cluster: SIGKILL workers of chosen roles at chosen steps of one run and record what
happened, for tests/test_chaos.py and benchmarks/bench_chaos.py.

A kill waits until the run has logged ``after_step`` steps and, after an earlier kill, until the run has
trained again; a kill ``during_checkpoint`` then waits until a checkpoint is being written (its directory
holds files but no completion record yet) and kills the worker in that window.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from calm_dist.train.report import read_jsonl


@dataclass(frozen=True)
class Kill:
    title: str  # the Ray actor class in the process title, e.g. "AnchorRank1" or "AugmentStage0"
    after_step: int
    during_checkpoint: bool = False


@dataclass
class KillRecord:
    kill: Kill
    killed_at: float  # wall clock
    logged_steps: int  # steps metrics.jsonl held when the worker was killed
    checkpoint: str | None = None  # the checkpoint being written, for a kill during one


@dataclass
class Chaos:
    run_dir: Path
    kills: list[Kill]
    done: list[KillRecord] = field(default_factory=list)
    error: BaseException | None = None

    def step_records(self) -> list[dict]:
        return [record for record in read_jsonl(self.run_dir / "metrics.jsonl") if "loss" in record]

    def restarts_seen(self) -> list[float]:
        """Wall clock of each restart the driver announced (a failure note in events.jsonl)."""
        return [event["time"] for event in read_jsonl(self.run_dir / "events.jsonl")
                if event["event"] == "note" and event["message"].startswith("worker failure")]

    def recovery_seconds(self) -> list[float]:
        """Per kill: seconds from the SIGKILL to the first step trained after the restart it caused (steps a
        surviving rank finishes right after the kill, before the loss is seen, do not count)."""
        records = self.step_records()
        return [min(r["time"] for r in records if r["time"] > restart) - record.killed_at
                for record, restart in zip(self.done, self.restarts_seen(), strict=True)]


def pid_titled(title: str) -> int | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if title.encode() in handle.read():
                    return int(pid)
        except OSError:
            continue
    return None


def _writing_checkpoint(store: Path) -> str | None:
    """A checkpoint directory with files but no completion record yet."""
    if not store.is_dir():
        return None
    for directory in store.glob("step_*"):
        if directory.is_dir() and not (directory / "meta.json").exists() and any(directory.iterdir()):
            return directory.name
    return None


def _wait(condition, timeout_s: float, poll_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return False


def unleash(chaos: Chaos, checkpoints: Path, timeout_s: float = 300) -> threading.Thread:
    """A thread that carries out ``chaos.kills`` in order while the run goes on."""

    def trained_since(moment: float) -> bool:
        return any(record["time"] > moment for record in chaos.step_records())

    def act() -> None:
        try:
            for kill in chaos.kills:
                previous = chaos.done[-1].killed_at if chaos.done else 0.0
                if not _wait(lambda: len(chaos.step_records()) >= kill.after_step and trained_since(previous),
                             timeout_s, 0.02):
                    raise TimeoutError(f"the run never reached step {kill.after_step} for {kill}")
                writing = None
                if kill.during_checkpoint:
                    found = _wait(lambda: _writing_checkpoint(checkpoints) is not None, timeout_s, 0.001)
                    writing = _writing_checkpoint(checkpoints) if found else None
                    if writing is None:
                        raise TimeoutError(f"no checkpoint write seen for {kill}")
                pid = pid_titled(kill.title)
                if pid is None:
                    raise RuntimeError(f"no process titled {kill.title}")
                os.kill(pid, signal.SIGKILL)
                chaos.done.append(KillRecord(kill, time.time(), len(chaos.step_records()), writing))
        except BaseException as error:  # reported by the caller
            chaos.error = error

    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    return thread
