"""What scoring a model on a suite gives: :class:`EvalResult` (``mergelab.eval`` re-exports it; the zoo's
CLIP scorer returns one too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class EvalResult:
    suite: str
    accuracy: dict[str, float]  # task -> accuracy on that task's test split
    average: float
    normalized: dict[str, float] | None  # task -> accuracy / expert accuracy (None if expert accuracies unknown)
    seconds: float

    @property
    def normalized_average(self) -> float | None:
        return sum(self.normalized.values()) / len(self.normalized) if self.normalized else None

    def to_json(self) -> dict[str, Any]:
        return {"suite": self.suite, "accuracy": self.accuracy, "average": self.average,
                "normalized": self.normalized, "normalized_average": self.normalized_average,
                "seconds": round(self.seconds, 3)}

    def table(self) -> str:
        """A plain-text table: one row per task, then the average."""
        rows = [("task", "accuracy", "normalized")]
        for task, acc in self.accuracy.items():
            norm = self.normalized.get(task) if self.normalized else None
            rows.append((task, f"{acc:.4f}", "-" if norm is None else f"{norm:.4f}"))
        norm_avg = self.normalized_average
        rows.append(("average", f"{self.average:.4f}", "-" if norm_avg is None else f"{norm_avg:.4f}"))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{a:<{width}}  {b:>8}  {c:>10}" for a, b, c in rows)
