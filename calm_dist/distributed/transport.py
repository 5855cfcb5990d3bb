"""Point-to-point activation transport, tagged by micro-batch, with optional bf16 on the wire.

Senders keep at most ``max_inflight`` sends outstanding (back-pressure); receivers post their
receives ahead of use and wait only when the tensor is needed. Both count what they move.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TAG_SLOTS = 64  # tags per micro-batch: one per bridge, plus the stage-to-stage hidden state
HIDDEN_SLOT = TAG_SLOTS - 1


def wire_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def sequence_of(unit_index: int, anchor_index: int, anchor_ranks: int) -> int:
    """The sequence number of one anchor rank's micro-batch of a unit (``data_pipeline.Unit``): anchor ranks
    and augment stages number the run's micro-batches alike."""
    return unit_index * anchor_ranks + anchor_index


def tag_of(sequence: int, slot: int) -> int:
    """A tag unique to (micro-batch sequence number, slot) within a window of 2**20 micro-batches."""
    assert 0 <= slot < TAG_SLOTS
    return (sequence % (1 << 20)) * TAG_SLOTS + slot


@dataclass
class TransportCounters:
    bytes_sent: int = 0
    bytes_received: int = 0
    wait_s: float = 0.0

    def snapshot_and_reset(self) -> dict:
        values = {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "wait_s": self.wait_s}
        self.bytes_sent = self.bytes_received = 0
        self.wait_s = 0.0
        return values


class ActivationSender:
    def __init__(self, group, dtype: torch.dtype, max_inflight: int):
        self.group, self.dtype, self.max_inflight = group, dtype, max_inflight
        self._pending: deque = deque()
        self.counters = TransportCounters()

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        payload = tensor.detach().to(self.dtype).contiguous()
        self._pending.append((self.group.send([payload], dst, tag), payload))
        self.counters.bytes_sent += payload.numel() * payload.element_size()
        while len(self._pending) > self.max_inflight:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        work, _ = self._pending.popleft()
        started = time.perf_counter()
        work.wait()
        self.counters.wait_s += time.perf_counter() - started

    def flush(self) -> None:
        while self._pending:
            self._wait_oldest()


class ActivationReceiver:
    def __init__(self, group, dtype: torch.dtype, device: torch.device):
        self.group, self.dtype, self.device = group, dtype, device
        self._posted: dict = {}
        self.counters = TransportCounters()

    def post(self, key, shape: tuple[int, ...], src: int, tag: int) -> None:
        buffer = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._posted[key] = (self.group.recv([buffer], src, tag), buffer)

    def wait(self, key, compute_dtype: torch.dtype) -> torch.Tensor:
        work, buffer = self._posted.pop(key)
        started = time.perf_counter()
        work.wait()
        self.counters.wait_s += time.perf_counter() - started
        self.counters.bytes_received += buffer.numel() * buffer.element_size()
        return buffer.to(compute_dtype)

    @property
    def outstanding(self) -> int:
        return len(self._posted)
