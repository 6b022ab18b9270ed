"""What the report draws for each kind of experiment: pure functions from stored runs to a Figure.

Conventions: a base method keeps its colour (``colours``, one palette per report), weave's pooling is a
marker; many runs are a grouped dot plot (a row per run), curves are lines each with its own marker and
linestyle; the base model (task arithmetic at scaling 0) is a reference line, never a series; every value
axis is zoomed to the data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mergelab.experiment.store import Row
from mergelab.report.dots import Dots, dot_figure
from mergelab.report.plots import Reference, Series, heatmap_figure, line_figure, panels_figure
from mergelab.report.style import (
    REFERENCE,
    Style,
    base_method,
    dot_styles,
    is_base_model,
    line_styles,
    reference_styles,
    variant,
)
from mergelab.report.tables import spread

LOG_PARAMS = frozenset({"rank_ratio"})  # swept over decades: equal steps on a log axis
Curves = Mapping[str, tuple[Sequence[float], Sequence[float]]]


def _dot_rows(runs: Sequence[Row], values: Mapping[str, Sequence[float | None]],
              colours: Mapping[str, str]) -> tuple[list[Dots], list[tuple[str, Style]]]:
    """A dot row per run (``values[run.label]``), runs of one base method together (plain run first), and
    what each marker means (when the runs differ in more than their base method)."""
    groups = list(dict.fromkeys(base_method(r) for r in runs))
    ordered = sorted(runs, key=lambda r: (groups.index(base_method(r)), variant(r) != ""))  # stable within
    styles = dot_styles([(base_method(r), variant(r)) for r in ordered], colours)
    rows = [Dots(r.label, values[r.label], s, base_method(r)) for r, s in zip(ordered, styles, strict=True)]
    meaning: dict[str, Style] = {}
    for r, s in zip(ordered, styles, strict=True):
        meaning.setdefault(variant(r) or "the method itself", s)
    return rows, list(meaning.items()) if len(meaning) > 1 else []


def tasks_figure(title: str, tasks: Sequence[str], runs: Sequence[Row], colours: Mapping[str, str]) -> Any:
    """Accuracy of each run on each task and on average: a panel per task, a row per run; a base-model run
    is the reference line."""
    def scores(r: Row) -> list[float | None]:
        m = r.metrics or {}
        return [m.get("average"), *(m.get("accuracy", {}).get(t) for t in tasks)]

    base = [r for r in runs if is_base_model(r)]
    shown = [r for r in runs if not is_base_model(r)] or list(runs)
    rows, legend = _dot_rows(shown, {r.label: scores(r) for r in shown}, colours)
    refs = {f"base model (run {base[0].label!r})": scores(base[0])} if base and len(shown) < len(runs) else {}
    return dot_figure(title, ["average", *tasks], rows, xlabel="accuracy",
                      references=refs, legend=legend)


def heldout_figure(title: str, held: Sequence[str], by_label: Mapping[str, Mapping[str, Row]],
                   colours: Mapping[str, str]) -> Any:
    """Domain generalisation: a panel per held-out task (and the mean over them), a row per run; the base
    model (when run) is the reference line in each panel, the axis zoomed so 1-2 points show."""
    values: dict[str, list[float | None]] = {}
    for label, runs in by_label.items():
        accs = [float((runs[t].metrics or {})["accuracy"][t]) if t in runs else None for t in held]
        known = [a for a in accs if a is not None]
        values[label] = [sum(known) / len(known) if len(known) == len(held) else None, *accs]
    first = {label: next(iter(runs.values())) for label, runs in by_label.items()}
    base = [label for label, r in first.items() if is_base_model(r)]
    shown = [r for label, r in first.items() if label not in base] or list(first.values())
    rows, legend = _dot_rows(shown, values, colours)
    refs = {f"base model (run {label!r})": values[label] for label in base if len(shown) < len(first)}
    return dot_figure(title, ["mean", *held], rows, xlabel="accuracy",
                      references=refs, legend=legend)


def _references(rows: Sequence[Row], colours: Mapping[str, str]) -> list[Reference]:
    """Horizontal lines at the runs' average accuracy; the base model in black."""
    styles = reference_styles([base_method(r) for r in rows], colours)
    return [Reference(r.label, float((r.metrics or {})["average"]),
                      Style(REFERENCE, "none", "--") if is_base_model(r) else s)
            for r, s in zip(rows, styles, strict=True) if (r.metrics or {}).get("average") is not None]


def sweep_figure(title: str, param: str, groups: Curves, group_rows: Mapping[str, Row], baselines: Sequence[Row],
                 colours: Mapping[str, str], n_tasks: int) -> Any:
    """Average accuracy against a swept hyperparameter, a line per sweep; the experiment's runs that were not
    swept (``baselines``) as labelled horizontal lines. Log x when the values span decades (0 on a linear
    stretch)."""
    styles = line_styles([base_method(group_rows[g]) if g in group_rows else g for g in groups], colours)
    series = [Series(g, xs, ys, s) for (g, (xs, ys)), s in zip(groups.items(), styles, strict=True)]
    xs = sorted({x for values, _ in groups.values() for x in values})
    scale, note = _sweep_axis(param, xs)
    return line_figure(title, param + note, f"average accuracy over the {n_tasks} tasks", series,
                       references=_references(baselines, colours), x_scale=scale,
                       xticks=xs if len(xs) <= 12 else None)


def _sweep_axis(param: str, xs: Sequence[float]) -> tuple[str, str]:
    """The x scale of a sweep and the note for its label: log when the values span decades (0 on a linear
    stretch: symlog)."""
    positive = [x for x in xs if x > 0]
    if positive and (param in LOG_PARAMS or max(positive) >= 10 * min(positive)):
        scale = "symlog" if len(positive) < len(xs) else "log"
        return scale, f" (log scale{f'; linear from 0 to {min(positive):g}' if scale == 'symlog' else ''})"
    return "linear", ""


def sweep_tasks_figure(title: str, param: str, tasks: Sequence[str], swept: Sequence[Row],
                       colours: Mapping[str, str]) -> Any:
    """Each task's accuracy against a swept hyperparameter (CART Fig. 5): a panel per task, a line per sweep."""
    groups: dict[str, list[Row]] = {}
    for row in swept:
        if param in row.config.get("swept", []):
            groups.setdefault(row.config.get("group", row.method), []).append(row)
    styles = line_styles([base_method(rows[0]) for rows in groups.values()], colours)
    panels: dict[str, list[Series]] = {}
    for task in tasks:
        for (group, rows), style in zip(groups.items(), styles, strict=True):
            points = sorted((float(r.config["params"][param]), float((r.metrics or {})["accuracy"][task]))
                            for r in rows)
            panels.setdefault(task, []).append(Series(group, [p[0] for p in points], [p[1] for p in points], style))
    xs = sorted({x for series in panels.values() for s in series for x in s.xs})
    scale, note = _sweep_axis(param, xs)
    return panels_figure(title, param + note, "accuracy on the task", panels, x_scale=scale,
                         xticks=xs if len(xs) <= 12 else None)


def acc_sweep_figure(title: str, param: str, groups: Mapping[str, tuple[Sequence[float], Sequence[float],
                     Sequence[float]]], group_rows: Mapping[str, Row], colours: Mapping[str, str]) -> Any:
    """Continual merging: ACC against a swept hyperparameter, mean ± std over task orders, a line per sweep."""
    styles = line_styles([base_method(group_rows[g]) if g in group_rows else g for g in groups], colours)
    series = [Series(g, xs, ys, s, err=err) for (g, (xs, ys, err)), s in zip(groups.items(), styles, strict=True)]
    xs = sorted({x for values, _, _ in groups.values() for x in values})
    return line_figure(title, param, "ACC: final accuracy over all tasks\n(mean ± std over task orders)", series,
                       xticks=xs if len(xs) <= 12 else None)


def subsets_figure(title: str, stats: Mapping[str, Mapping[int, tuple[float, float, int]]],
                   full: Mapping[str, tuple[int, float]], group_rows: Mapping[str, Row], colours: Mapping[str, str],
                   what: str) -> Any:
    """``what`` against the number of merged tasks N, mean ± std over the subsets of each size (error bars),
    plus N = all tasks from the runs merged on all of them (``full``: ``{label: (N, value)}``). Lines are
    nudged apart sideways so their error bars do not hide each other."""
    styles = line_styles([base_method(group_rows[g]) if g in group_rows else g for g in stats], colours)
    series, sizes = [], set()
    for k, ((label, by_size), style) in enumerate(zip(stats.items(), styles, strict=True)):
        points = {n: (m, s) for n, (m, s, _) in by_size.items()}
        if label in full:
            points.setdefault(full[label][0], (full[label][1], 0.0))
        ns = sorted(points)
        sizes.update(ns)
        nudge = 0.06 * (k - (len(stats) - 1) / 2)
        series.append(Series(label, [n + nudge for n in ns], [points[n][0] for n in ns], style,
                             err=[points[n][1] for n in ns]))
    alone = sorted({n for label, (n, _) in full.items() if label in stats})
    xlabel = "number of merged tasks N" + (f" (N = {alone[-1]}: all tasks, one set)" if alone else "")
    return line_figure(title, xlabel, f"{what} over the merged tasks\n"
                       "(mean ± std over the task subsets of size N)", series, xticks=sorted(sizes))


def adapt_figure(title: str, curves: Curves, rows: Mapping[str, Row], colours: Mapping[str, str]) -> Any:
    """Average accuracy against test-time adaptation steps, a line per adapted run."""
    styles = line_styles([base_method(rows[label]) if label in rows else label for label in curves], colours)
    series = [Series(label, xs, ys, s) for (label, (xs, ys)), s in zip(curves.items(), styles, strict=True)]
    return line_figure(title, "adaptation step", "average accuracy over the tasks", series)


def _step_series(by_label: Mapping[str, Sequence[Row]], colours: Mapping[str, str], key: str) -> list[Series]:
    """Per label, ``metrics[key]`` (one value per merging step) as a line: mean over the task orders, min-max band."""
    styles = line_styles([base_method(runs[0]) for runs in by_label.values()], colours)
    series = []
    for (label, runs), style in zip(by_label.items(), styles, strict=True):
        curves = [[float(v) for v in (r.metrics or {})[key]] for r in runs]
        curves = [c for c in curves if len(c) == len(curves[0])]  # one suite: all orders are as long
        mean, low, high = spread(curves)
        n = len(curves)
        series.append(Series(f"{label} ({n} order{'s' if n > 1 else ''})", [float(k) for k in range(1, len(mean) + 1)],
                             mean, style, band=(low, high)))
    return series


def steps_figure(title: str, by_label: Mapping[str, Sequence[Row]], colours: Mapping[str, str]) -> Any:
    """Continual merging: average accuracy over the tasks merged so far after each step, the mean over task
    orders as the line and min-max over orders as the band."""
    return _per_step_figure(title, "average accuracy over the tasks merged so far",
                            _step_series(by_label, colours, "step_average"))


def _per_step_figure(title: str, ylabel: str, series: list[Series]) -> Any:
    """Lines over the merging steps, an integer tick per step (up to 12 steps)."""
    longest = max((len(s.xs) for s in series), default=0)
    return line_figure(title, "number of merged tasks", f"{ylabel}\n(line: mean over task orders; band: min to max)",
                       series, xticks=list(range(1, longest + 1)) if longest <= 12 else None)


# what a recorded per-step quantity is compared with: OPCM's Fig. 7 sets its Eq. (10) lambda_t against sqrt(t)
STEP_REFERENCES: dict[str, tuple[str, Any]] = {"lambda_t": ("sqrt(t)", lambda t: t ** 0.5)}


def recorded_figure(title: str, name: str, by_label: Mapping[str, Sequence[Row]], colours: Mapping[str, str]) -> Any:
    """A quantity the continual rule recorded after every step (``metrics[name]``), mean and band over orders,
    with its reference curve when it has one (``STEP_REFERENCES``)."""
    series = _step_series(by_label, colours, name)
    longest = max((len(s.xs) for s in series), default=0)
    if name in STEP_REFERENCES and longest:
        label, curve = STEP_REFERENCES[name]
        xs = [float(t) for t in range(1, longest + 1)]
        series.append(Series(label, xs, [curve(t) for t in xs], Style(REFERENCE, "", "--")))
    return _per_step_figure(title, f"{name} after each step", series)


def matrix_figure(title: str, run: Row) -> Any:
    """A continual run's accuracy matrix as stored: row k = the model after merging the k-th task of the
    run's order, column i = the i-th task of that order (above the diagonal: not merged yet)."""
    m = run.metrics or {}
    order = list(m["order"])
    return heatmap_figure(title, [f"{k}. {t}" for k, t in enumerate(order, 1)], order, m["matrix"],
                          xlabel="accuracy on task (in this merge order)", ylabel="after merging step k (its task)",
                          vmin=0.0, vmax=1.0)


def cosine_figure(title: str, tasks: Sequence[str], cos: Sequence[Sequence[float]]) -> Any:
    return heatmap_figure(title, tasks, tasks, cos, vmin=min(0.0, min(min(r) for r in cos)), vmax=1.0)
