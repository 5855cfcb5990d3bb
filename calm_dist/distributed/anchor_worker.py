"""The loop of one anchor rank: receive taps one unit ahead, train or evaluate through the ZeRO-3 engine,
report, checkpoint."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

import data_pipeline as dp
from calm_dist.distributed.groups import Groups
from calm_dist.distributed.transport import ActivationReceiver, sequence_of, tag_of
from calm_dist.model.alignment import batch_alignment
from calm_dist.reports import CheckpointReport, EvalReport, EvalTotals, StepReport

Report = Callable[[StepReport | EvalReport | CheckpointReport], None]


@dataclass(frozen=True)
class CheckpointWrite:
    """A checkpoint written at a step; ``name`` is the published name on anchor rank 0, None elsewhere."""

    name: str | None


def _all_reduce_sum(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


class AnchorWorker:
    """``after_step(step, reader_position, records)`` runs on every anchor rank after each step's last unit
    (the checkpointer); ``reader_position`` is the reader state whose next batch is step ``step + 1``'s, and
    ``records`` the metrics records reported since the last checkpoint (stored with the checkpoint, so a
    driver that dies before logging them loses nothing)."""

    def __init__(self, engine, groups: Groups, source, receiver: ActivationReceiver, augment_hiddens: Sequence[int],
                 after_step: Callable[[int, dict, list[dict]], "CheckpointWrite | None"] | None = None,
                 augment_columns: Sequence[str | None] = ()):
        """``source``: a ``BatchSource``; ``augment_hiddens``: each augmenting model's hidden size, in model order;
        ``augment_columns``: per model, the batch's tokenisation it reads (None or empty: the anchor's tokens).
        A model with its own tokenisation sends states as long as that tokenisation (padded per micro-batch);
        the cross-attention mask comes from the offsets read beside the micro-batch."""
        self.engine, self.groups, self.source, self.receiver = engine, groups, source, receiver
        self.augment_hiddens, self.after_step = list(augment_hiddens), after_step
        self.augment_columns = tuple(augment_columns) or (None,) * len(self.augment_hiddens)
        self.compute_dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
        self.world = groups.topology.anchor_ranks

    def _post(self, unit_index: int, batch: dict) -> None:
        topology = self.groups.topology
        sequence = sequence_of(unit_index, self.groups.role.index, self.world)
        for pipeline, hidden, column in zip(topology.pipelines, self.augment_hiddens, self.augment_columns,
                                            strict=True):
            ids = batch["input_ids"] if column is None else batch[f"{column}_input_ids"]
            shape = (*ids.shape, hidden)
            for slot, layer in pipeline.wire_slots:
                source = pipeline.stage_rank(pipeline.stage_of_layer(layer))
                self.receiver.post((unit_index, slot), shape, source, tag_of(sequence, slot))

    def _states(self, unit_index: int) -> list[torch.Tensor]:
        """One tensor per bridge, in flat bridge order (bridges reading the same layer share it)."""
        slots = self.groups.topology.bridge_slots
        received = {slot: self.receiver.wait((unit_index, slot), self.compute_dtype) for slot in sorted(set(slots))}
        return [received[slot] for slot in slots]

    def _forward(self, batch: dict, states: list[torch.Tensor]):
        device = self.groups.device
        weight = batch.get("row_weight")
        return self.engine(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           labels=batch["labels"].to(device), augment_states=states, logits_for="labels",
                           row_weight=None if weight is None else weight.to(device),
                           **batch_alignment(batch, self.augment_columns, device)).statistics

    def _train_step(self, batch: dict, states: list[torch.Tensor]) -> tuple[float, int]:
        """One optimizer step. Each rank's loss is its summed token loss over the *global* token count,
        times the anchor world size (DeepSpeed averages gradients over ranks), so gradients equal the
        single-process mean."""
        statistics = self._forward(batch, states)
        tokens = int(_all_reduce_sum([float(statistics.tokens)], self.world)[0])
        self.engine.backward(statistics.loss_sum * self.world / max(tokens, 1))
        self.engine.step()
        loss_sum = _all_reduce_sum([float(statistics.loss_sum.detach())], self.world)[0]
        return loss_sum / max(tokens, 1), tokens

    def _eval_totals(self, batch: dict, states: list[torch.Tensor]) -> EvalTotals:
        with torch.no_grad():
            statistics = self._forward(batch, states)
        return EvalTotals(float(statistics.loss_sum), statistics.tokens, statistics.exact_rows, statistics.rows)

    def run(self, units: Iterable[dp.Unit], on_report: Report | None = None) -> list[float]:
        """Every unit in order; returns the training losses."""
        unpublished: list[dict] = []

        def report(item) -> None:
            if not isinstance(item, CheckpointReport):
                unpublished.append(item.record())
            if on_report is not None:
                on_report(item)

        losses: list[float] = []
        iterator = iter(units)
        unit = next(iterator, None)
        if unit is None:
            return losses
        batch, position = self.source.batch(unit)
        self._post(0, batch)
        index, trained_step, totals = 0, -1, EvalTotals()
        started = evaluation_started = time.perf_counter()
        while unit is not None:
            following = next(iterator, None)
            if following is not None:
                next_batch, next_position = self.source.batch(following)
                self._post(index + 1, next_batch)  # receives for the next unit are posted ahead
            states = self._states(index)
            if unit.kind == dp.TRAIN:
                lr = self.engine.get_lr()[0]
                loss, tokens = self._train_step(batch, states)
                losses.append(loss)
                counters = self.receiver.counters.snapshot_and_reset()
                trained_step, reader_position = unit.step, position
                # The step is reported before its checkpoint is published: a restart from that checkpoint
                # then never lacks the step's record.
                report(StepReport(unit.step, loss, lr, tokens, time.perf_counter() - started, counters["wait_s"],
                                  counters["bytes_received"], time.time(), self.world))
                evaluation_started = time.perf_counter()
            else:
                totals = totals.add(self._eval_totals(batch, states))
                self.receiver.counters.snapshot_and_reset()  # step reports count their own unit's wire only
                if unit.ends_eval:
                    summed = EvalTotals.from_list(_all_reduce_sum(totals.as_list(), self.world))
                    report(EvalReport(unit.step, unit.eval_set, summed, time.perf_counter() - evaluation_started))
                    totals, evaluation_started = EvalTotals(), time.perf_counter()
            if dp.step_ends_after(unit, following) and trained_step == unit.step and self.after_step is not None:
                saving = time.perf_counter()
                written = self.after_step(unit.step, reader_position, list(unpublished))
                if written is not None:  # a checkpoint of this step now holds these records
                    unpublished.clear()
                    if written.name is not None:  # anchor rank 0 published it
                        report(CheckpointReport(unit.step, written.name, time.perf_counter() - saving, time.time()))
            if following is not None:
                batch, position = next_batch, next_position
            unit, index = following, index + 1
            if unit is not None and unit.kind == dp.TRAIN:
                started = time.perf_counter()
        return losses
