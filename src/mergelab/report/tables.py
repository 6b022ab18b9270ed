"""Aggregations of stored runs into tables (pure functions over :class:`mergelab.experiment.Row`)."""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Sequence
from typing import Any

from mergelab.experiment.store import Row


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats with 4 decimals, None as '-'."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def per_task(rows: Sequence[Row]) -> tuple[list[str], list[list[Any]]]:
    """One row per run: label, each task's accuracy, average, normalised average (tasks in first-seen order)."""
    tasks: list[str] = []
    for row in rows:
        tasks += [t for t in row.config["eval_tasks"] if t not in tasks]  # the suite's order, not the JSON's
    out = []
    for row in rows:
        m = row.metrics or {}
        out.append([row.label, *[m["accuracy"].get(t) for t in tasks], m.get("average"),
                    m.get("normalized_average")])
    return tasks, out


def subset_size_means(rows: Sequence[Row], metric: str = "average") -> dict[str, dict[int, tuple[float, int]]]:
    """``{group label: {number of tasks: (mean of ``metric``, number of subsets)}}`` (CART Fig. 6):
    ``metric`` is ``"average"`` (accuracy) or ``"normalized_average"`` (accuracy / expert accuracy);
    runs without it are left out."""
    return {label: {k: (m, n) for k, (m, _, n) in sizes.items()}
            for label, sizes in subset_size_stats(rows, metric).items()}


def subset_size_stats(rows: Sequence[Row], metric: str = "average") -> dict[str, dict[int, tuple[float, float, int]]]:
    """As :func:`subset_size_means`, with the population std over the subsets of each size (0 for one):
    ``{label: {number of tasks: (mean, std, number of subsets)}}``."""
    acc: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        value = (row.metrics or {}).get(metric)
        if value is None:
            continue
        size = len(row.config["tasks"])
        acc.setdefault(row.label, {}).setdefault(size, []).append(float(value))
    return {label: {k: (*mean_std(v), len(v)) for k, v in sorted(sizes.items())} for label, sizes in acc.items()}


def spread(curves: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    """Pointwise mean, min and max of equally long curves (a continual run's step averages over task orders)."""
    points = list(zip(*curves, strict=True))
    return ([statistics.fmean(p) for p in points], [min(p) for p in points], [max(p) for p in points])


def swept_values(row: Row) -> Iterator[tuple[str, str, float]]:
    """``(hyperparameter, group, value)`` for each numeric hyperparameter the run took from its entry's ``sweep``."""
    for name in row.config.get("swept", []):
        value = row.config["params"][name]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, row.config.get("group", row.method), float(value)


def sweeps(rows: Sequence[Row]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """``{hyperparameter: {group: (values, average accuracies)}}`` for runs from a numeric ``sweep``."""
    out: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for row in rows:
        for name, group, value in swept_values(row):
            xs, ys = out.setdefault(name, {}).setdefault(group, ([], []))
            xs.append(value)
            ys.append(float((row.metrics or {})["average"]))
    for groups in out.values():  # sort each line by x
        for group, (xs, ys) in list(groups.items()):
            pairs = sorted(zip(xs, ys, strict=True))
            groups[group] = ([p[0] for p in pairs], [p[1] for p in pairs])
    return out


def continual_sweeps(rows: Sequence[Row]) -> dict[str, dict[str, tuple[list[float], list[float], list[float]]]]:
    """``{hyperparameter: {group: (values, mean ACC, std of ACC)}}`` over the task orders run at each value, for
    continual runs from a numeric ``sweep`` (OPCM's alpha, continual task arithmetic's scaling)."""
    acc: dict[str, dict[str, dict[float, list[float]]]] = {}
    for row in rows:
        for name, group, value in swept_values(row):
            acc.setdefault(name, {}).setdefault(group, {}).setdefault(value, []).append(float((row.metrics or {})["acc"]))
    return {name: {group: (sorted(by_x), [mean_std(by_x[x])[0] for x in sorted(by_x)],
                           [mean_std(by_x[x])[1] for x in sorted(by_x)]) for group, by_x in groups.items()}
            for name, groups in acc.items()}


def adapt_curves(rows: Sequence[Row]) -> dict[str, tuple[list[float], list[float]]]:
    """``{label: (steps, average accuracy)}`` from the accuracy trace of test-time-adapted runs (``metrics.adapt``)."""
    out = {}
    for row in rows:
        trace = ((row.metrics or {}).get("adapt") or {}).get("trace", [])
        points = [(float(e["step"]), float(e["average"])) for e in trace if "average" in e]
        if points:
            out[row.label] = ([p[0] for p in points], [p[1] for p in points])
    return out


def adapt_entropy(rows: Sequence[Row]) -> dict[str, tuple[float, float, int]]:
    """``{label: (first step's objective, mean of the last 10 steps', steps)}`` of test-time-adapted runs."""
    out = {}
    for row in rows:
        values = [float(e["entropy"]) for e in ((row.metrics or {}).get("adapt") or {}).get("trace", []) if "entropy" in e]
        if values:
            tail = values[-10:]
            out[row.label] = (values[0], sum(tail) / len(tail), len(values))
    return out
