"""What a composition run reports as it goes: one record per optimizer step, per evaluation and per
checkpoint. The single-process loop and every anchor rank emit the same types."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class StepReport:
    step: int
    loss: float
    lr: float
    tokens: int  # labelled tokens of the global batch
    step_s: float
    wait_s: float = 0.0  # anchor rank 0's wait for augment activations (distributed runs)
    bytes_received: int = 0
    finished_at: float = 0.0  # wall clock (time.time()) when the step was done
    anchor_ranks: int = 1

    def record(self) -> dict:
        return {"step": self.step, "loss": self.loss, "lr": self.lr, "tokens": self.tokens,
                "step_s": round(self.step_s, 4), "tokens_per_s": round(self.tokens / max(self.step_s, 1e-9), 1),
                "anchor_wait_fraction": round(self.wait_s / max(self.step_s, 1e-9), 4),
                "bytes_received": self.bytes_received, "time": round(self.finished_at, 3),
                "anchor_ranks": self.anchor_ranks}


@dataclass
class EvalTotals:
    """Sums over an evaluation set: summed token loss, labelled tokens, rows whose every labelled token
    is the argmax (teacher-forced exact match, which equals greedy decoding's exact match), rows."""

    loss_sum: float = 0.0
    tokens: int = 0
    exact_rows: int = 0
    rows: int = 0

    def add(self, other: "EvalTotals") -> "EvalTotals":
        return EvalTotals(self.loss_sum + other.loss_sum, self.tokens + other.tokens,
                          self.exact_rows + other.exact_rows, self.rows + other.rows)

    def as_list(self) -> list[float]:
        return [self.loss_sum, float(self.tokens), float(self.exact_rows), float(self.rows)]

    @classmethod
    def from_list(cls, values) -> "EvalTotals":
        loss_sum, tokens, exact, rows = (float(v) for v in values)
        return cls(loss_sum, round(tokens), round(exact), round(rows))


@dataclass
class EvalReport:
    step: int  # optimizer steps done before the evaluation (0 = the anchor alone)
    name: str  # the evaluation set
    totals: EvalTotals
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.totals.loss_sum / max(self.totals.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 80.0))

    @property
    def exact_match(self) -> float:
        """Percentage of rows whose completion is reproduced token for token."""
        return 100.0 * self.totals.exact_rows / max(self.totals.rows, 1)

    def metrics(self) -> dict:
        """``<set>_loss``, ``<set>_perplexity``, ``<set>_exact_match``, ``<set>_rows``, ``<set>_tokens``."""
        return {f"{self.name}_loss": self.loss, f"{self.name}_perplexity": self.perplexity,
                f"{self.name}_exact_match": self.exact_match, f"{self.name}_rows": self.totals.rows,
                f"{self.name}_tokens": self.totals.tokens}

    def record(self) -> dict:
        return {"step": self.step, "eval": self.name, **self.metrics(), "eval_s": round(self.seconds, 3)}


@dataclass
class CheckpointReport:
    """Sent after the step's own report, once the checkpoint of ``step`` is published (anchor rank 0)."""

    step: int
    name: str
    seconds: float  # writing and publishing, all ranks
    finished_at: float
