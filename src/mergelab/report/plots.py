"""PNG plots of experiment results. matplotlib is imported inside each function (the ``report`` extra), and
figures are built with ``matplotlib.figure.Figure`` (no pyplot global state, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        from mergelab.errors import MergelabError

        raise MergelabError("plots need matplotlib: pip install 'mergelab[report]'") from None
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def bar_chart(path: Path, title: str, groups: Sequence[str], series: Mapping[str, Sequence[float | None]],
              ylabel: str = "accuracy") -> Path:
    """Grouped bars: one group per task (x axis), one bar per series (method)."""
    fig = _figure(max(6.0, 0.35 * len(groups) * max(1, len(series)) + 2), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [0.0 if v is None else v for v in values], width, label=name)
    ax.set_xticks(range(len(groups)), list(groups), rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small", ncols=2)
    fig.savefig(path)
    return path


def line_plot(path: Path, title: str, xlabel: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
              ylabel: str = "average accuracy", log_x: bool = False) -> Path:
    """One line per series: ``{name: (xs, ys)}`` (lambda sweeps, rank sweeps, accuracy vs number of tasks)."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=name)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)
    return path


def heatmap(path: Path, title: str, rows: Sequence[str], cols: Sequence[str], values: Sequence[Sequence[float | None]],
            vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis") -> Path:
    """A matrix with its values written in the cells (None cells left blank)."""
    import math

    grid = [[math.nan if v is None else float(v) for v in row] for row in values]
    fig = _figure(max(4.0, 0.6 * len(cols) + 2.5), max(3.0, 0.5 * len(rows) + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(grid, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    low, high = image.get_clim()
    ax.set_xticks(range(len(cols)), list(cols), rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), list(rows))
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                light = high > low and (v - low) / (high - low) > 0.6  # dark text on the light end of viridis
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize="x-small", color="k" if light else "w")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.savefig(path)
    return path
