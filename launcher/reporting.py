"""The driver's view of a distributed run: one progress bar, metrics.jsonl and TensorBoard, events.jsonl."""
from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from calm_dist.reports import CheckpointReport, EvalReport, StepReport
from calm_dist.train.report import EventLog, MetricsLogger, read_jsonl


def _record_key(record: dict) -> tuple:
    return ("eval", record["eval"], record["step"]) if "eval" in record else ("step", record["step"])


class StepLogger:
    """Consumes the reports of anchor rank 0 (steps, evaluations, checkpoints)."""

    def __init__(self, run_dir: Path, total_steps: int, description: str = "composition (distributed)"):
        self.metrics = MetricsLogger(run_dir)
        self.events = EventLog(run_dir / "events.jsonl")
        self.bar = tqdm(total=total_steps, desc=description, dynamic_ncols=True)

    def __call__(self, report: StepReport | EvalReport | CheckpointReport) -> None:
        if isinstance(report, CheckpointReport):
            self.events.log({"event": "checkpoint", "step": report.step, "name": report.name,
                             "seconds": round(report.seconds, 4), "time": round(report.finished_at, 3)})
            return
        if isinstance(report, EvalReport):
            self.metrics.log(report.record())
            self.bar.write(f"eval at step {report.step}: {report.name} loss {report.loss:.4f}, "
                           f"exact match {report.exact_match:.1f}% ({report.totals.rows} rows, {report.seconds:.1f} s)")
            return
        record = report.record()
        self.metrics.log(record)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{report.loss:.4f}", wait=f"{record['anchor_wait_fraction']:.0%}")

    def note(self, message: str) -> None:
        """A line for the operator that the progress bar does not overwrite, also kept in events.jsonl."""
        self.bar.write(message)
        self.events.log({"event": "note", "message": message, "time": round(time.time(), 3)})

    def rewind(self, step: int, evaluates_again: bool = False) -> None:
        """Training restarts after ``step``: later records are dropped, the bar goes back."""
        self.metrics.rewind(step, evaluates_again)
        self.bar.n = step
        self.bar.refresh()

    def resume_at(self, point, store, max_steps: int) -> None:
        """Training restarts from checkpoint ``point`` (None: from the start). Records after it are dropped;
        records up to it that metrics.jsonl lacks (a driver that died before logging them) are restored from
        the checkpoint store, where anchor rank 0 writes them with every checkpoint."""
        step = point.step if point is not None else 0
        evaluates_again = step == 0 or step >= max_steps
        self.rewind(step, evaluates_again)
        if point is None:
            return
        logged = {_record_key(record) for record in read_jsonl(self.metrics.path)}
        restored = [record for record in store.records_up_to(step) if _record_key(record) not in logged
                    and not (evaluates_again and "eval" in record and record["step"] == step)]
        for record in restored:
            self.metrics.log(record)
        if restored:
            self.note(f"restored {len(restored)} records up to step {step} from the checkpoints "
                      "(the driver that trained them stopped before logging them)")

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
