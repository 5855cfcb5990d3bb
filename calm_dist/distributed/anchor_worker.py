"""The training loop of one anchor rank: receive taps ahead, step the ZeRO-3 engine, report."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from calm_dist.distributed.groups import Groups
from calm_dist.distributed.transport import ActivationReceiver, tag_of
from calm_dist.model.loss import per_token_loss


@dataclass
class StepReport:
    step: int
    loss: float
    lr: float
    tokens: int
    step_s: float
    wait_s: float
    bytes_received: int
    finished_at: float = 0.0  # wall clock (time.time()) on the worker when the step was done
    anchor_ranks: int = 1


def global_token_loss(logits, labels, attention_mask, world: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(loss to backpropagate, this rank's summed token loss, global token count).

    Each rank's loss is its token-loss sum over the *global* token count, times the anchor world
    size (DeepSpeed averages gradients over ranks), so gradients equal the single-process mean.
    """
    losses, valid = per_token_loss(logits, labels, attention_mask)
    local_sum = (losses * valid).sum()
    count = valid.sum().to(torch.float64)
    if world > 1:
        dist.all_reduce(count)
    total = int(count.item())
    return local_sum * world / max(total, 1), local_sum.detach(), total


@dataclass
class CheckpointReport:
    """Sent after the step's own report, once the checkpoint of ``step`` is published (anchor rank 0)."""

    step: int
    name: str
    seconds: float  # writing and publishing, all ranks
    finished_at: float


class AnchorWorker:
    """``after_step(step, reader_position)`` runs on every anchor rank after each optimizer step (the
    checkpointer); ``reader_position`` is the reader state whose next batch is step ``step + 1``'s."""

    def __init__(self, engine, groups: Groups, reader, receiver: ActivationReceiver, augment_hiddens: Sequence[int],
                 after_step: Callable[[int, dict], str | None] | None = None):
        """``augment_hiddens``: the hidden size of each augmenting model, in model order."""
        self.engine, self.groups, self.reader, self.receiver = engine, groups, reader, receiver
        self.augment_hiddens, self.after_step = list(augment_hiddens), after_step
        self.compute_dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32

    def _post(self, step: int, batch: dict) -> None:
        topology, index = self.groups.topology, self.groups.role.index
        sequence = step * topology.anchor_ranks + index
        for pipeline, hidden in zip(topology.pipelines, self.augment_hiddens, strict=True):
            shape = (*batch["input_ids"].shape, hidden)
            for slot, layer in pipeline.wire_slots:
                source = pipeline.stage_rank(pipeline.stage_of_layer(layer))
                self.receiver.post((step, slot), shape, source, tag_of(sequence, slot))

    def _states(self, step: int) -> list[torch.Tensor]:
        """One tensor per bridge, in flat bridge order (bridges reading the same layer share it)."""
        slots = self.groups.topology.bridge_slots
        received = {slot: self.receiver.wait((step, slot), self.compute_dtype) for slot in sorted(set(slots))}
        return [received[slot] for slot in slots]

    def _step(self, batch: dict, states: list[torch.Tensor]) -> tuple[float, int]:
        device = self.groups.device
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        logits = self.engine(ids, attention_mask=mask, augment_states=states).logits
        world = self.groups.topology.anchor_ranks
        loss, local_sum, tokens = global_token_loss(logits, labels, mask, world)
        self.engine.backward(loss)
        self.engine.step()
        if world > 1:
            dist.all_reduce(local_sum)
        return float(local_sum) / max(tokens, 1), tokens

    def train(self, steps: range, on_step: Callable[[StepReport], None] | None = None) -> list[float]:
        losses = []
        if not steps:  # resumed at the last step: nothing left to train
            return losses
        batch = next(self.reader)
        self._post(steps.start, batch)
        for step in steps:
            started = time.perf_counter()
            position = self.reader.state_dict()
            next_batch = next(self.reader) if step + 1 < steps.stop else None
            if next_batch is not None:
                self._post(step + 1, next_batch)  # receives for the next step are posted ahead
            states = self._states(step)
            lr = self.engine.get_lr()[0]
            loss, tokens = self._step(batch, states)
            counters = self.receiver.counters.snapshot_and_reset()
            losses.append(loss)
            # The step is reported before its checkpoint is published: a restart from that checkpoint
            # then never lacks the step's record.
            if on_step is not None:
                on_step(StepReport(step + 1, loss, lr, tokens, time.perf_counter() - started, counters["wait_s"],
                                   counters["bytes_received"], time.time(), self.groups.topology.anchor_ranks))
            saving = time.perf_counter()
            published = self.after_step(step + 1, position) if self.after_step is not None else None
            if published is not None and on_step is not None:
                on_step(CheckpointReport(step + 1, published, time.perf_counter() - saving, time.time()))
            batch = next_batch
        return losses
