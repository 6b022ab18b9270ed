"""Figures of experiment results: pure functions that build a ``matplotlib.figure.Figure`` (no pyplot global
state, no display needed) and :func:`save`, which writes one. matplotlib is imported inside the functions
(the ``report`` extra). Legends sit outside the data area; titles wrap to the figure's width."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergelab.report.style import Style


def figure(width: float, height: float) -> Any:
    """An empty figure, ``width`` x ``height`` inches at 100 dpi, laid out so labels and legends fit."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        from mergelab.errors import MergelabError

        raise MergelabError("plots need matplotlib: pip install 'mergelab[report]'") from None
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def save(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG to ``path``; returns ``path``."""
    fig.savefig(path)
    return path


def wrap(title: str, width_in: float) -> str:
    """``title`` broken into lines that fit a figure ``width_in`` inches wide (about 12 characters an inch)."""
    return textwrap.fill(title, width=max(30, int(width_in * 12)), break_on_hyphens=False)


@dataclass(frozen=True)
class Series:
    """A line: ``ys`` against ``xs``, with optional error bars (± ``err``) or a shaded ``band`` (low, high)."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    style: Style
    err: Sequence[float] | None = None
    band: tuple[Sequence[float], Sequence[float]] | None = None


@dataclass(frozen=True)
class Reference:
    """A horizontal line at ``value`` across the plot (a baseline run)."""

    label: str
    value: float
    style: Style


def line_figure(title: str, xlabel: str, ylabel: str, series: Sequence[Series], *,
                references: Sequence[Reference] = (), x_scale: str = "linear",
                xticks: Sequence[float] | None = None) -> Any:
    """One line per series, references as horizontal lines, the legend right of the axes. ``x_scale`` is
    ``linear``, ``log`` or ``symlog`` (log with a linear stretch from 0 to the smallest positive x, for sweeps
    that include 0); ``xticks`` puts ticks at exactly these values (swept values, numbers of tasks)."""
    fig = figure(8.0, 4.2)
    ax = fig.add_subplot()
    for ref in references:
        ax.axhline(ref.value, color=ref.style.colour, linestyle=ref.style.linestyle, linewidth=1.2,
                   label=f"{ref.label} ({ref.value:.4f})")
    for s in series:
        kw = {"color": s.style.colour, "marker": s.style.marker, "linestyle": s.style.linestyle, "label": s.label}
        if s.err is not None:
            ax.errorbar(list(s.xs), list(s.ys), yerr=list(s.err), capsize=3, markersize=6, **kw)
        else:
            ax.plot(list(s.xs), list(s.ys), markersize=6, **kw)
        if s.band is not None:
            ax.fill_between(list(s.xs), list(s.band[0]), list(s.band[1]), color=s.style.colour, alpha=0.15,
                            linewidth=0)
    if x_scale == "symlog":
        positive = [x for s in series for x in s.xs if x > 0]
        ax.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
    elif x_scale == "log":
        ax.set_xscale("log")
    if xticks is not None:
        ax.set_xticks(list(xticks), [f"{x:g}" for x in xticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(wrap(title, 6.0), fontsize="medium")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize="small")
    return fig


def panels_figure(title: str, xlabel: str, ylabel: str, panels: Mapping[str, Sequence[Series]], *,
                  x_scale: str = "linear", xticks: Sequence[float] | None = None) -> Any:
    """Small multiples: one axes per panel (a task), the same series in each, one legend right of them all;
    each panel's y axis zoomed to its own values. Scales and ticks as :func:`line_figure`."""
    columns = min(4, max(1, len(panels)))
    rows = math.ceil(len(panels) / columns)
    fig = figure(3.0 * columns + 2.5, 2.6 * rows + 0.8)
    axes = fig.subplots(rows, columns, squeeze=False)
    positive = [x for series in panels.values() for s in series for x in s.xs if x > 0]
    for ax, (name, series) in zip(axes.flat, panels.items(), strict=False):
        for s in series:
            ax.plot(list(s.xs), list(s.ys), color=s.style.colour, marker=s.style.marker,
                    linestyle=s.style.linestyle, markersize=4, label=s.label)
        if x_scale == "symlog":
            ax.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
        elif x_scale == "log":
            ax.set_xscale("log")
        if xticks is not None:
            ax.set_xticks(list(xticks), [f"{x:g}" for x in xticks], rotation=90, fontsize="x-small")
            ax.minorticks_off()
        ax.set_title(name, fontsize="small")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.supxlabel(xlabel, fontsize="small")
    fig.supylabel(ylabel, fontsize="small")
    fig.suptitle(wrap(title, 3.0 * columns + 2.0), fontsize="medium")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize="small")
    return fig


def heatmap_figure(title: str, rows: Sequence[str], cols: Sequence[str], values: Sequence[Sequence[float | None]], *,
                   xlabel: str = "", ylabel: str = "", vmin: float | None = None, vmax: float | None = None,
                   cmap: str = "viridis") -> Any:
    """A matrix with its values written in the cells (None cells left blank); ``rows[i]`` labels
    ``values[i]``, ``cols[j]`` labels ``values[i][j]``."""
    grid = [[math.nan if v is None else float(v) for v in row] for row in values]
    width = max(4.5, 0.6 * len(cols) + 3.0)
    fig = figure(width, max(3.2, 0.5 * len(rows) + 2.0))
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
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(wrap(title, width - 1.0), fontsize="medium")
    fig.colorbar(image, ax=ax)
    return fig
