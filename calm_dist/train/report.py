"""What a run leaves behind: metrics.jsonl, TensorBoard events, results.json, a loss-curve PNG."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomically(path: Path, payload) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(payload, indent=2))
    os.replace(temporary, path)


class MetricsLogger:
    """One JSON object per optimizer step and per evaluation in metrics.jsonl, mirrored to TensorBoard."""

    def __init__(self, run_dir: Path, filename: str = "metrics.jsonl", tensorboard_dir: str = "tensorboard"):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / filename
        self._file = open(self.path, "a", buffering=1)
        self._writer = SummaryWriter(str(run_dir / tensorboard_dir))

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, step)

    def rewind(self, step: int, evaluates_again: bool = False) -> None:
        """Forgets the records after ``step`` (a run resumed from the checkpoint of ``step``), and the
        evaluations at ``step`` too when the resumed run ``evaluates_again`` there."""
        self._file.close()
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and _kept(json.loads(line), step, evaluates_again)]
        temporary = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, self.path)
        self._file = open(self.path, "a", buffering=1)

    def close(self) -> None:
        self._file.close()
        self._writer.close()


def _kept(record: dict, step: int, evaluates_again: bool) -> bool:
    if "eval" in record and evaluates_again:
        return record["step"] < step
    return record["step"] <= step


class EventLog:
    """events.jsonl: what happened besides steps (checkpoints, failures, restarts), one JSON object a line."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, event: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(event) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curve(run_dir: Path, filename: str = "metrics.jsonl") -> list[tuple[int, float]]:
    """(step, loss) of every step in one of a run's metrics files (the composition's by default)."""
    return [(record["step"], record["loss"]) for record in read_jsonl(run_dir / filename) if "loss" in record]


def eval_curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, eval loss) of each evaluation set."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if "eval" in record:
            curves.setdefault(f"eval: {record['eval']}", []).append((record["step"], record[f"{record['eval']}_loss"]))
    return curves


def evaluations_at(records: list[dict], step: int) -> dict:
    """Every evaluation set's metrics at ``step``, merged (``<set>_loss``, ``<set>_exact_match``, ...)."""
    merged: dict = {}
    for record in records:
        if "eval" in record and record["step"] == step:
            merged.update({key: value for key, value in record.items() if key not in ("step", "eval", "eval_s")})
    return merged


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for axis, (title, points) in zip(axes[0], curves.items()):
        if points:
            steps, losses = zip(*points)
            axis.plot(steps, losses, linewidth=1)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        if points and min(loss for _, loss in points) > 0:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
