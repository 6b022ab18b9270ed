"""Accuracy metrics of a merged model, and continual-merging metrics (pure functions over an accuracy matrix).

``matrix[j][i]`` is the accuracy on task ``i`` (in merge order) of the model merged after step ``j``
(``j >= i``; entries above the diagonal, tasks not merged yet, are ``None``). Following the OPCM paper
(Tang et al. 2025, Sec. 6.1, Eq. 16, which takes both metrics from Lin et al. 2022, TRGP)::

    ACC = 1/T       sum_{i=1..T}   a_i(theta_T)
    BWT = 1/(T-1)   sum_{i=1..T-1} a_i(theta_T) - a_i(theta_i)

with ``theta_i`` the model merged after step ``i`` and ``theta_T`` the final one; BWT < 0 is forgetting.
The paper's text (arXiv:2501.09522) defines both in words around Eq. 16 ("the parameters of the merged
model at the i-th step and the final merged model"); the formulas are those of GEM (Lopez-Paz & Ranzato 2017),
which Lin et al. use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def acc(matrix: Sequence[Sequence[float | None]]) -> float:
    """Average accuracy of the final merged model over all ``T`` tasks."""
    final = matrix[-1]
    if any(a is None for a in final):
        raise ValueError("the last row of the accuracy matrix must be complete")
    return sum(float(a) for a in final if a is not None) / len(final)


def bwt(matrix: Sequence[Sequence[float | None]]) -> float:
    """Backward transfer: mean over tasks 1..T-1 of (final accuracy - accuracy right after merging it).

    Defined as 0.0 for a single task (nothing can be forgotten).
    """
    t = len(matrix)
    if t < 2:
        return 0.0
    diffs = []
    for i in range(t - 1):
        final, then = matrix[-1][i], matrix[i][i]
        if final is None or then is None:
            raise ValueError(f"accuracy matrix lacks task {i} after step {i} or after the last step")
        diffs.append(float(final) - float(then))
    return sum(diffs) / (t - 1)


def step_averages(matrix: Sequence[Sequence[float | None]]) -> list[float]:
    """Average accuracy over the tasks merged so far, after each step (OPCM Fig. 5's curve)."""
    out = []
    for j, row in enumerate(matrix):
        seen = [float(a) for a in row[: j + 1] if a is not None]
        out.append(sum(seen) / len(seen))
    return out


def accuracy_metrics(accuracy: Mapping[str, float], tasks: list[str], reference: Mapping[str, float]) -> dict[str, Any]:
    """Per-task accuracy and its mean; with every task's ``reference`` (its expert's accuracy on the same
    split), normalised accuracy (accuracy / reference) too."""
    acc = {t: float(accuracy[t]) for t in tasks}
    out: dict[str, Any] = {"accuracy": acc, "average": sum(acc.values()) / len(acc)}
    if all(reference.get(t) for t in tasks):
        out["normalized"] = {t: a / reference[t] for t, a in acc.items()}
        out["normalized_average"] = sum(out["normalized"].values()) / len(tasks)
    return out
