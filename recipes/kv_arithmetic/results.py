"""The recipe's results: exact-match accuracy per task for every row of the paper's table, evaluated
with the framework's teacher-forced statistics (every completion token the argmax, which for greedy
decoding is exact match of the generated completion), and the table itself."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import data_pipeline as dp
from calm_dist.train.evaluate import BatchStatistics, evaluate_set

from .task_data import KV_ARITHMETIC, KV_ARITHMETIC_HELDIN, KV_SUBSTITUTION, NUMERIC_ARITHMETIC, TABLE_SETS

HELDIN_TITLE = "kv_arith (held-in)"
ROW_LABELS = {
    "m_A": "m_A (augment)", "m_B": "m_B (anchor)", "calm": "CALM m_A+m_B", "calm_heldin_keys": "CALM, held-in keys",
    "lora": "LoRA (anchor)", "calm_random_augment": "CALM (random m_A)", "calm_vanilla_augment": "CALM (vanilla m_A)",
    "calm_two_augments": "CALM (2 augmenting models)", "calm_different_tokenizer": "CALM (different tokenizer)",
}
LABEL_WIDTH = max(len(label) for label in ROW_LABELS.values())


@dataclass(frozen=True)
class TaskScores:
    """Exact-match accuracy (%) on each evaluation set of a row (held-out keys unless named held-in)."""

    kv_substitution: float
    numeric_arithmetic: float
    kv_arithmetic: float
    kv_arithmetic_heldin: float | None = None  # unseen expressions over held-in keys

    def cells(self) -> dict[str, float]:
        """The row in results.json: the paper's three columns, and held-in keys when evaluated."""
        return {name: value for name, value in asdict(self).items() if value is not None}

    @classmethod
    def from_job_metrics(cls, metrics: Mapping[str, float]) -> "TaskScores":
        """From the generic job's evaluation metrics (``<set>_exact_match``)."""
        heldin = metrics.get(f"{KV_ARITHMETIC_HELDIN}_exact_match")
        return cls(*(float(metrics[f"{name}_exact_match"]) for name in TABLE_SETS),
                   None if heldin is None else float(heldin))


def evaluate_scores(statistics: BatchStatistics, data: dp.PreparedData, batch_size: int,
                    heldin: bool = False) -> TaskScores:
    """A model's scores on the job's tokenised evaluation sets; ``heldin`` adds held-in keys."""
    names = (*TABLE_SETS, KV_ARITHMETIC_HELDIN) if heldin else TABLE_SETS
    layout = dp.anchor_layout(data.augment_columns, data.pad_ids)  # with every augmenting model's own tokens
    accuracy = {name: evaluate_set(statistics, data.eval_dir(name), name, batch_size, data.pad_id,
                                   layout=layout).exact_match
                for name in names}
    return TaskScores(accuracy[KV_SUBSTITUTION], accuracy[NUMERIC_ARITHMETIC], accuracy[KV_ARITHMETIC],
                      accuracy.get(KV_ARITHMETIC_HELDIN))


@dataclass(frozen=True)
class LoraChoice:
    """The LoRA row's adapter: the rank whose trainable-parameter count is closest to the composition's."""

    rank: int
    lora_alpha: float
    target_modules: list[str]
    adapted_layers: int
    trainable_parameters: int
    composition_parameters: int
    relative_gap: float


@dataclass(frozen=True)
class RowAugment:
    """An augmenting model a row composed instead of the job's m_A."""

    kind: str  # untrained | numeric_arithmetic | keys<i>of2 | characters
    seed: int  # of its initial weights (and batches)
    path: str | None = None  # None: built in memory, never trained
    sha256: str | None = None
    trained_on: str | None = None
    seconds: float | None = None
    final_loss: float | None = None
    vocab_size: int | None = None  # its own tokenizer's, when it has one
    kv_substitution_alone: float | None = None  # its own accuracy, when it reads other tokens than m_B


@dataclass(frozen=True)
class BaselineResult:
    """One extra row: its scores, what it trained, and (LoRA) its adapter or (ablations) its m_A(s)."""

    row: str
    scores: TaskScores
    trainable_parameters: int
    seconds: float
    lora: LoraChoice | None = None
    augments: tuple[RowAugment, ...] = ()

    def summary(self) -> dict:
        """Its entry in run_summary.json."""
        entry = {"trainable_parameters": self.trainable_parameters, "seconds": self.seconds}
        if self.lora is not None:
            entry["lora"] = asdict(self.lora)
        if self.augments:
            entry["augments"] = [{k: v for k, v in asdict(a).items() if v is not None} for a in self.augments]
        return entry


@dataclass(frozen=True)
class KVResults:
    """The paper's table: m_A and m_B alone, CALM (the generic job's final evaluation), the baselines."""

    m_A: TaskScores
    m_B: TaskScores
    calm: TaskScores  # kv_arithmetic_heldin: CALM on unseen expressions over held-in keys
    baselines: tuple[BaselineResult, ...] = ()

    def rows(self) -> dict[str, dict[str, float]]:
        """results.json's rows (besides the generic job's ``anchor`` and ``calm`` metrics)."""
        calm = self.calm.cells()
        heldin = calm.pop(KV_ARITHMETIC_HELDIN)
        rows = {"m_A": self.m_A.cells(), "m_B": self.m_B.cells(), "calm": calm,
                "calm_heldin_keys": {KV_ARITHMETIC: heldin}}
        rows.update({baseline.row: baseline.scores.cells() for baseline in self.baselines})
        return rows

    def table(self) -> str:
        """Accuracy % per model and task. With baseline rows a held-in-keys column is added, and CALM's
        held-in score moves into it; without, it is a row of its own."""
        columns: tuple[str, ...] = TABLE_SETS
        if self.baselines:
            columns = (*TABLE_SETS, KV_ARITHMETIC_HELDIN)
        rows = [(row, [getattr(scores, column) for column in columns])
                for row, scores in (("m_A", self.m_A), ("m_B", self.m_B), ("calm", self.calm),
                                    *((baseline.row, baseline.scores) for baseline in self.baselines))]
        if not self.baselines:
            rows.append(("calm_heldin_keys", [None, None, self.calm.kv_arithmetic_heldin]))
        titles = {KV_ARITHMETIC_HELDIN: HELDIN_TITLE}
        header = f"| {'model':<{LABEL_WIDTH}} | " + " | ".join(f"{titles.get(c, c):>18}" for c in columns) + " |"
        lines = [header, "|" + "-" * (LABEL_WIDTH + 2) + "|" + ("-" * 20 + "|") * len(columns)]
        for row, cells in rows:
            text = [f"{cell:>18.1f}" if cell is not None else f"{'-':>18}" for cell in cells]
            lines.append(f"| {ROW_LABELS[row]:<{LABEL_WIDTH}} | " + " | ".join(text) + " |")
        return "\n".join(lines)
