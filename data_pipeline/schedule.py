"""The order of a run's micro-batches: training steps and the evaluations between them.

Every role of a distributed run (each anchor rank, each augment stage) and the single-process twin
walk the same sequence of units, so they agree on which batch comes next without talking.
Evaluations run at step 0 (the anchor alone: the bridges start at zero), every ``every_steps``, and
after the last step; each comes right after its step and before that step's checkpoint, so a run
resumed from a checkpoint at step ``s`` has already evaluated at ``s``. A resumed run starts at the
checkpoint's step: a finished run (``first_step == max_steps``) only evaluates again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

TRAIN, EVAL = "train", "eval"


@dataclass(frozen=True)
class Unit:
    kind: str  # TRAIN or EVAL
    step: int  # TRAIN: the optimizer step it makes (1-based); EVAL: the steps done before it
    eval_set: str = ""
    batch: int = 0  # EVAL: batch index within the set
    batches: int = 1  # EVAL: the set's batch count

    @property
    def ends_eval(self) -> bool:
        return self.kind == EVAL and self.batch == self.batches - 1


def evaluates_at(step: int, max_steps: int, every_steps: int) -> bool:
    return step == 0 or step == max_steps or bool(every_steps and step % every_steps == 0)


def run_units(first_step: int, max_steps: int, every_steps: int, eval_batches: Mapping[str, int]) -> Iterator[Unit]:
    """``eval_batches``: each evaluation set's batch count (per rank), in evaluation order."""

    def evaluation(step: int) -> Iterator[Unit]:
        for name, count in eval_batches.items():
            for index in range(count):
                yield Unit(EVAL, step, name, index, count)

    if first_step == 0 or first_step == max_steps:
        yield from evaluation(first_step)
    for step in range(first_step + 1, max_steps + 1):
        yield Unit(TRAIN, step)
        if evaluates_at(step, max_steps, every_steps):
            yield from evaluation(step)


def step_ends_after(unit: Unit, following: Unit | None) -> bool:
    """Whether ``unit`` is the last unit of its step (the point where that step's checkpoint is written)."""
    return following is None or following.kind == TRAIN
