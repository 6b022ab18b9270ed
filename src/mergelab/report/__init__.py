"""Markdown reports with PNG plots from an experiment results database (``mergelab report DB --out report.md``).

Per experiment: who produced it (command, versions, hardware, git commit); then by kind
* multitask: per-task accuracy table (+ average, normalised average) and a grouped dot plot of the runs (a
  row per run, a zoomed panel per task), line plots of every numeric ``sweep`` (lambda sweeps, rank sweeps on
  a log axis, the runs not swept as horizontal lines), and accuracy against the number of merged tasks for
  task subsets, mean ± std over the subsets (CART Fig. 6);
* domain generalization: accuracy on each held-out task and the mean over hold-outs, the base model (task
  arithmetic at scaling 0) as the reference;
* continual: ACC and BWT (mean and std over task orders), accuracy-matrix heatmaps, accuracy per step (mean
  and min-max over orders);
* similarity: the task-vector cosine-similarity heatmap.
Only numbers stored in the database appear; nothing is computed that was not run. What each plot draws is in
:mod:`mergelab.report.figures`, how series look in :mod:`mergelab.report.style`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError
from mergelab.experiment.store import Row, Store
from mergelab.io.leftovers import write_text
from mergelab.report import figures, plots
from mergelab.report.style import base_method, palette
from mergelab.report.tables import (
    adapt_curves,
    adapt_entropy,
    continual_sweeps,
    md_table,
    mean_std,
    per_task,
    spread,
    subset_size_means,
    subset_size_stats,
    sweeps,
    swept_values,
)

__all__ = ["write_report"]


def write_report(db: str | Path, out: str | Path = "report.md", *, experiment: str | None = None) -> Path:
    """Write the Markdown report of ``db`` (a results database, or a folder of ``*.sqlite`` ones) to ``out``
    and its plots to ``<out stem>_files/``; returns ``out``."""
    out = Path(out)
    paths = sorted(Path(db).glob("*.sqlite")) if Path(db).is_dir() else [Path(db)]
    if not paths:
        raise MergelabError("no *.sqlite results database in this folder", file=str(db))
    done: list[Row] = []
    failed: list[Row] = []
    for path in paths:
        with Store(path, create=False) as store:
            done += store.rows(status="ok", experiment=experiment)
            failed += store.rows(status="failed", experiment=experiment)
    if not done and not failed:
        raise MergelabError("no runs stored" + (f" for experiment {experiment!r}" if experiment else ""),
                            file=str(db))
    assets = out.parent / f"{out.stem}_files"
    assets.mkdir(parents=True, exist_ok=True)
    lines = ["# Experiment report", "",
             f"From {', '.join(f'`{p.name}`' for p in paths)}: {len(done)} finished runs, {len(failed)} failed. "
             "Accuracies are fractions (1.0 = 100 %); normalised = accuracy / the task's expert accuracy.", ""]
    colours = palette(base_method(r) for r in done)  # a method keeps its colour across the report
    for name in dict.fromkeys(r.experiment for r in done):
        rows = [r for r in done if r.experiment == name]
        lines += _section(name, rows, _Place(assets, out.parent, name, "", colours))
    if failed:
        lines += ["## Failed runs", "", md_table(["experiment", "run", "error"],
                                                   [[r.experiment, r.label, r.error] for r in failed]), ""]
    write_text(out, "\n".join(lines))
    return out


@dataclass(frozen=True)
class _Place:
    """Where a section's plots go and what they share: the assets folder, the Markdown's folder, the
    experiment and suite (file names and titles) and the report's colour per base method."""

    assets: Path
    root: Path
    experiment: str
    suite: str
    colours: dict[str, str]

    def where(self) -> str:
        return f"{self.experiment}, {self.suite}"

    def save(self, fig: Any, name: str, alt: str) -> str:
        """Write ``fig`` as ``<experiment>_<suite>_<name>.png``; returns the Markdown image link."""
        path = plots.save(fig, self.assets / f"{_slug(self.experiment, self.suite)}_{name}.png")
        return _image(path, self.root, alt)


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)).strip("-")


def _image(path: Path, root: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(root).as_posix()})"


def _provenance(rows: Sequence[Row]) -> list[str]:
    first = rows[0]
    commands = sorted({r.command for r in rows if r.command})
    commits = sorted({r.git_commit for r in rows if r.git_commit})
    versions = ", ".join(f"{k} {v}" for k, v in first.versions.items() if v)
    hardware = first.hardware
    hw = f"{hardware.get('platform')}, {hardware.get('cpus')} CPUs, device {hardware.get('device')}"
    if hardware.get("gpu"):
        hw += f" ({hardware['gpu']})"
    dates = sorted(r.created for r in rows)
    merge_s = sum(r.merge_seconds or 0.0 for r in rows)
    eval_s = sum(r.eval_seconds or 0.0 for r in rows)
    return [f"- command: {'; '.join(f'`{c}`' for c in commands) or '-'}",
            f"- versions: {versions}", f"- hardware: {hw}", f"- git commit: {', '.join(commits) or '-'}",
            f"- runs: {len(rows)}, {dates[0]} to {dates[-1]}; merging {merge_s:.0f} s, evaluation {eval_s:.0f} s", ""]


def _section(name: str, rows: list[Row], place: _Place) -> list[str]:
    kind = rows[0].kind
    lines = [f"## {name} ({kind.replace('_', ' ')})", "", *_provenance(rows)]
    for suite in dict.fromkeys(r.suite for r in rows):
        in_suite = [r for r in rows if r.suite == suite]
        lines += [f"### {suite}", ""]
        if kind.startswith("search"):  # a `mergelab search` stored here: trials and the chosen candidate
            from mergelab.report.searches import search_lines

            lines += search_lines(in_suite)
            continue
        render = {"multitask": _multitask, "domain_generalization": _domain_generalization, "routing": _routing,
                  "continual": _continual, "similarity": _similarity}[kind]
        lines += render(in_suite, _Place(place.assets, place.root, name, suite, place.colours))
    return lines


def _multitask(rows: list[Row], place: _Place) -> list[str]:
    lines: list[str] = []
    full = [r for r in rows if r.config["subset"] == "all"]
    if full:
        tasks, table = per_task(full)
        lines += ["Merged on all tasks, scored on each:", "",
                  md_table(["run", *tasks, "average", "normalised"], table), ""]
        fixed = {r.label for r in full if not r.config.get("swept")}  # sweeps get line plots below
        shown = [r for r in full if not fixed or r.label in fixed]
        fig = figures.tasks_figure(f"Accuracy per task and on average, {place.where()} (a row per run; each panel's axis zoomed to its values)", tasks,
                                   shown, place.colours)
        lines += [place.save(fig, "tasks", "accuracy per task"), ""]
        lines += _adapted(full, place)
    swept = [r for r in rows if r.config["subset"] == "all" and r.config.get("swept")]
    baselines = [r for r in full if not r.config.get("swept")]
    group_rows = {r.config.get("group", r.method): r for r in swept}
    for param, groups in sweeps(swept).items():
        lines += [f"Sweep of `{param}` (average accuracy over all tasks):", "",
                  md_table([param, *groups], _sweep_rows(groups)), ""]
        n_tasks = len(swept[0].config["eval_tasks"])
        fig = figures.sweep_figure(f"{param} sweep, {place.where()} (horizontal lines: the runs not swept)", param,
                                   groups, group_rows, baselines, place.colours, n_tasks)
        lines += [place.save(fig, f"sweep_{_slug(param)}", f"{param} sweep"), ""]
        tasks = list(dict.fromkeys(t for r in swept for t in r.config["eval_tasks"]))
        fig = figures.sweep_tasks_figure(f"{param} sweep, each task's accuracy, {place.where()}", param, tasks,
                                         swept, place.colours)
        lines += [place.save(fig, f"sweep_{_slug(param)}_tasks", f"{param} sweep per task"), ""]
    return lines + _subsets(rows, place)


def _subsets(rows: list[Row], place: _Place) -> list[str]:
    """CART Fig. 6: accuracy against the number of merged tasks, mean and std over the subsets of each size;
    the plot adds N = all tasks from the runs merged on all of them."""
    lines: list[str] = []
    subsets = [r for r in rows if r.config["subset"] != "all"]
    full = [r for r in rows if r.config["subset"] == "all"]
    group_rows = {r.label: r for r in subsets}
    for metric, what, suffix in (("average", "accuracy", ""), ("normalized_average", "normalised accuracy", "_normalised")):
        means = subset_size_means(subsets, metric)
        if not means:
            continue
        stats = subset_size_stats(subsets, metric)
        sizes = sorted({k for m in means.values() for k in m})
        lines += [f"Task subsets: average {what} over the merged tasks, mean over the subsets of each size "
                  "(number of subsets in brackets):", "",
                  md_table(["run", *[f"{k} tasks" for k in sizes]],
                           [[label, *[f"{m[k][0]:.4f} ({m[k][1]})" if k in m else None for k in sizes]]
                            for label, m in means.items()]), "",
                  f"Standard deviation of the average {what} over the subsets of each size (the plot's error bars):",
                  "", md_table(["run", *[f"{k} tasks" for k in sizes]],
                               [[label, *[s[k][1] if k in s else None for k in sizes]] for label, s in stats.items()]),
                  ""]
        whole = {r.label: (len(r.config["tasks"]), float(v)) for r in full
                 if (v := (r.metrics or {}).get(metric)) is not None}
        if len(sizes) > 1 or any(label in whole for label in stats):
            fig = figures.subsets_figure(f"{what.capitalize()} vs number of merged tasks, {place.where()}", stats,
                                         whole, group_rows, place.colours, f"average {what}")
            lines += [place.save(fig, f"subsets{suffix}", f"{what} vs number of tasks"), ""]
    return lines


def _adapted(rows: list[Row], place: _Place) -> list[str]:
    """Test-time-adapted runs: the objective's first and last values, and average accuracy against steps."""
    curves, entropy = adapt_curves(rows), adapt_entropy(rows)
    if not entropy:
        return []
    lines = ["Test-time adaptation: the objective (sum over tasks of the mean prediction entropy on a step's "
             "unlabelled batches) at the first step and averaged over the last 10:", "",
             md_table(["run", "steps", "objective, step 1", "objective, last 10"],
                      [[label, n, f"{a:.3f}", f"{b:.3f}"] for label, (a, b, n) in entropy.items()]), ""]
    if curves:
        steps = sorted({s for xs, _ in curves.values() for s in xs})
        lookup = {label: dict(zip(xs, ys, strict=True)) for label, (xs, ys) in curves.items()}
        lines += ["Average accuracy against adaptation steps (the trace; step 0 = the coefficients' initial value):", "",
                  md_table(["run", *[f"{s:g}" for s in steps]],
                           [[label, *[lookup[label].get(s) for s in steps]] for label in curves]), ""]
        fig = figures.adapt_figure(f"Average accuracy vs adaptation steps, {place.where()}", curves,
                                   {r.label: r for r in rows}, place.colours)
        lines += [place.save(fig, "adapt", "accuracy vs adaptation steps"), ""]
    return lines


def _sweep_rows(groups: dict[str, tuple[list[float], list[float]]]) -> list[list[object]]:
    xs = sorted({x for values, _ in groups.values() for x in values})
    lookup = {g: dict(zip(v, a, strict=True)) for g, (v, a) in groups.items()}
    return [[x, *[lookup[g].get(x) for g in groups]] for x in xs]


def _routing(rows: list[Row], place: _Place) -> list[str]:
    """CART's direct routing (Eq. 5): each task scored with its own routed model; laid out as held-out tasks."""
    return _domain_generalization(rows, place, "Each column: that task scored with the model routed to it (its "
                                  "own low-rank part around the anchor, CART Eq. 5).", "routed")


def _domain_generalization(rows: list[Row], place: _Place, caption: str = "Each column: that task held out, the "
                           "other experts merged, scored on the held-out task.", what: str = "held-out") -> list[str]:
    held: list[str] = list(dict.fromkeys(r.config["eval_tasks"][0] for r in rows))
    by_label: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_label.setdefault(r.label, {})[r.config["eval_tasks"][0]] = r
    table: list[list[object]] = []
    for label, runs in by_label.items():
        accs = [(runs[t].metrics or {})["accuracy"][t] if t in runs else None for t in held]
        norms = [(runs[t].metrics or {}).get("normalized", {}).get(t) if t in runs else None for t in held]
        known = [a for a in accs if a is not None]
        known_norm = [n for n in norms if n is not None]
        table.append([label, *accs, sum(known) / len(known) if known else None,
                      sum(known_norm) / len(known_norm) if len(known_norm) == len(held) else None])
    fig = figures.heldout_figure(f"Accuracy on the {what} task, {place.where()} (a row per run; each panel's axis "
                                 "zoomed to its values)", held, by_label, place.colours)
    name = "heldout" if what == "held-out" else what
    return [caption, "", md_table(["run", *held, "mean", "normalised"], table), "",
            place.save(fig, name, f"{what} accuracy"), "", *_mean_sweeps(rows, held, place, name)]


def _mean_sweeps(rows: list[Row], tasks: list[str], place: _Place, name: str) -> list[str]:
    """Runs from a numeric ``sweep``, one per task: the mean over the tasks against the swept value (CART Fig. 3)."""
    by_group: dict[str, dict[float, dict[str, float]]] = {}
    param = ""
    for r in rows:
        for key, group, value in swept_values(r):
            param, task = key, r.config["eval_tasks"][0]
            by_group.setdefault(group, {}).setdefault(value, {})[task] = float((r.metrics or {})["accuracy"][task])
    groups = {g: ([x for x in sorted(v) if len(v[x]) == len(tasks)],
                  [sum(v[x].values()) / len(tasks) for x in sorted(v) if len(v[x]) == len(tasks)])
              for g, v in by_group.items()}
    groups = {g: curve for g, curve in groups.items() if curve[0]}
    if not groups:
        return []
    group_rows = {r.config.get("group", r.method): r for r in rows}
    fig = figures.sweep_figure(f"{param} sweep, mean over the tasks, {place.where()}", param, groups, group_rows, [],
                               place.colours, len(tasks))
    return [f"Sweep of `{param}`: mean accuracy over the {len(tasks)} tasks:", "",
            md_table([param, *groups], _sweep_rows(groups)), "", place.save(fig, f"{name}_sweep_{_slug(param)}",
                                                                         f"{param} sweep"), ""]


def _continual(rows: list[Row], place: _Place) -> list[str]:
    by_label: dict[str, list[Row]] = {}
    for r in rows:
        by_label.setdefault(r.label, []).append(r)
    table = []
    lines: list[str] = []
    for label, runs in by_label.items():
        acc_m, acc_s = mean_std([float((r.metrics or {})["acc"]) for r in runs])
        bwt_m, bwt_s = mean_std([float((r.metrics or {})["bwt"]) for r in runs])
        table.append([label, len(runs), f"{acc_m:.4f} ± {acc_s:.4f}", f"{bwt_m:.4f} ± {bwt_s:.4f}"])
        run = next((r for r in runs if r.config["subset"] == "identity"), runs[0])  # the suite's own order first
        drawn = f"one of the {len(runs)} orders run" if len(runs) > 1 else "the only order run"
        title = f"{label}, {place.where()}: accuracy after each merging step, {run.config['subset']} order ({drawn})"
        lines += [place.save(figures.matrix_figure(title, run), f"{_slug(label)}_matrix", f"{label} accuracy matrix"),
                  ""]
    fig = figures.steps_figure(f"Average accuracy after each merging step, {place.where()}", by_label, place.colours)
    head = ["ACC: final model's mean accuracy over all tasks; BWT: mean over tasks 1..T-1 of (final accuracy - "
            "accuracy right after that task was merged) (OPCM Eq. 16). Mean ± std over task orders.", "",
            md_table(["run", "orders", "ACC", "BWT"], table), "", place.save(fig, "steps", "accuracy per step"), ""]
    head += _recorded(rows, by_label, place)
    group_rows = {r.config.get("group", r.method): r for r in rows}
    for param, groups in continual_sweeps([r for r in rows if r.config.get("swept")]).items():
        xs = sorted({x for values, _, _ in groups.values() for x in values})
        lookup = {g: {x: (m, s) for x, m, s in zip(*curve, strict=True)} for g, curve in groups.items()}
        head += [f"Sweep of `{param}`: ACC, mean ± std over task orders:", "",
                 md_table([param, *groups], [[x, *[f"{lookup[g][x][0]:.4f} ± {lookup[g][x][1]:.4f}" if x in lookup[g]
                                                   else None for g in groups]] for x in xs]), ""]
        fig = figures.acc_sweep_figure(f"{param} sweep, {place.where()}", param, groups, group_rows, place.colours)
        head += [place.save(fig, f"sweep_{_slug(param)}", f"{param} sweep"), ""]
    return head + lines


def _recorded(rows: list[Row], by_label: dict[str, list[Row]], place: _Place) -> list[str]:
    """What the continual rule recorded after every step (``metrics["recorded"]``, e.g. OPCM's lambda_t): a table
    of the mean over task orders per step, with the reference curve if it has one, and its figure."""
    out: list[str] = []
    for name in dict.fromkeys(n for r in rows for n in (r.metrics or {}).get("recorded", [])):
        having = {label: [r for r in runs if name in (r.metrics or {})] for label, runs in by_label.items()}
        having = {label: runs for label, runs in having.items() if runs}
        steps = max(len((r.metrics or {})[name]) for runs in having.values() for r in runs)
        table = [[label, *[f"{v:.3f}" for v in spread([(r.metrics or {})[name] for r in runs])[0]]]
                 for label, runs in having.items()]
        if name in figures.STEP_REFERENCES:
            ref, curve = figures.STEP_REFERENCES[name]
            table.append([ref, *[f"{curve(t):.3f}" for t in range(1, steps + 1)]])
        fig = figures.recorded_figure(f"{name} after each merging step, {place.where()}", name, having, place.colours)
        out += [f"`{name}` after each step (mean over task orders):", "",
                md_table(["run", *[f"step {t}" for t in range(1, steps + 1)]], table), "",
                place.save(fig, f"recorded_{_slug(name)}", f"{name} per step"), ""]
    return out


def _similarity(rows: list[Row], place: _Place) -> list[str]:
    m = rows[-1].metrics or {}
    tasks, cos = m["tasks"], m["cosine"]
    fig = figures.cosine_figure(f"Task-vector cosine similarity, {place.where()}", tasks, cos)
    return [md_table(["", *tasks], [[t, *row] for t, row in zip(tasks, cos, strict=True)]), "",
            place.save(fig, "cosine", "cosine similarity"), ""]
