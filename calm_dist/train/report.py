"""What a run leaves behind: metrics.jsonl, TensorBoard events, results.json, a loss-curve PNG."""
from __future__ import annotations

import json
import os
from pathlib import Path

ROWS = ("m_A", "m_B", "calm")
COLUMNS = ("kv_substitution", "numeric_arithmetic", "kv_arithmetic")
HELDIN_COLUMN = "kv_arithmetic_heldin"  # KV-Arithmetic over held-in keys, in the baselines' rows
ROW_LABELS = {
    "m_A": "m_A (augment)", "m_B": "m_B (anchor)", "calm": "CALM m_A+m_B", "calm_heldin_keys": "CALM, held-in keys",
    "lora": "LoRA (anchor)", "calm_random_augment": "CALM (random m_A)", "calm_vanilla_augment": "CALM (vanilla m_A)",
    "calm_two_augments": "CALM (2 augmenting models)", "calm_different_tokenizer": "CALM (different tokenizer)",
}
LABEL_WIDTH = max(len(label) for label in ROW_LABELS.values())


def write_json_atomically(path: Path, payload) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(payload, indent=2))
    os.replace(temporary, path)


class MetricsLogger:
    """One JSON object per optimizer step in metrics.jsonl, mirrored to TensorBoard."""

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

    def rewind(self, step: int) -> None:
        """Forgets the records after ``step`` (a run resumed from the checkpoint of ``step``)."""
        self._file.close()
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        temporary = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, self.path)
        self._file = open(self.path, "a", buffering=1)

    def close(self) -> None:
        self._file.close()
        self._writer.close()


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
    return [(record["step"], record["loss"]) for record in read_jsonl(run_dir / filename)]


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
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def format_table(results: dict) -> str:
    """The paper's table shape: accuracy % per model and task. With baseline rows a held-in-keys column
    is added, and CALM's held-in score moves into it."""
    rows = dict(results)
    columns = COLUMNS
    if any(HELDIN_COLUMN in cells for cells in results.values()):
        columns = COLUMNS + (HELDIN_COLUMN,)
        if "calm" in rows and "calm_heldin_keys" in rows:
            rows["calm"] = {**rows["calm"], HELDIN_COLUMN: rows.pop("calm_heldin_keys")["kv_arithmetic"]}
    titles = {HELDIN_COLUMN: "kv_arith (held-in)"}
    header = f"| {'model':<{LABEL_WIDTH}} | " + " | ".join(f"{titles.get(c, c):>18}" for c in columns) + " |"
    lines = [header, "|" + "-" * (LABEL_WIDTH + 2) + "|" + ("-" * 20 + "|") * len(columns)]
    for row, label in ROW_LABELS.items():
        if row not in rows:
            continue
        cells = [rows[row].get(column) for column in columns]
        text = [f"{c:>18.1f}" if isinstance(c, (int, float)) else f"{'-':>18}" for c in cells]
        lines.append(f"| {label:<{LABEL_WIDTH}} | " + " | ".join(text) + " |")
    return "\n".join(lines)
