"""The grouped dot plot: one panel per task (value on x, zoomed to the panel's data), one row per run, runs of
one base method next to each other. Rows, not colours, say which run a dot is, so 30 runs stay readable
(and greyscale too); colour (base method) and marker (variant) show the groups at a glance."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergelab.report.plots import figure, wrap
from mergelab.report.style import REFERENCE, Style

PANELS_PER_ROW = 5


@dataclass(frozen=True)
class Dots:
    """A run's values, one per panel (None: not scored), drawn as one row."""

    label: str
    values: Sequence[float | None]
    style: Style
    group: str  # a thin line separates groups (base methods)


def limits(values: Sequence[float], margin: float = 0.1) -> tuple[float, float]:
    """The panel's x range: the data's, widened by ``margin`` of it each side (at least half a point), so a
    1-2 point difference fills the panel instead of a sliver next to 0."""
    low, high = min(values), max(values)
    pad = max(margin * (high - low), 0.005)
    return low - pad, high + pad


def dot_figure(title: str, panels: Sequence[str], rows: Sequence[Dots], *, xlabel: str,
               references: Mapping[str, Sequence[float | None]] | None = None,
               legend: Sequence[tuple[str, Style]] = ()) -> Any:
    """``panels[p]`` shows ``row.values[p]`` of every row; ``references`` (``{label: value per panel}``, the
    base model) are vertical lines in each panel; ``legend`` explains the markers (and the references), below
    the panels."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    references = references or {}
    n = max(1, len(panels))
    ncols = math.ceil(n / math.ceil(n / PANELS_PER_ROW))
    nrows = math.ceil(n / ncols)
    label_in = 0.075 * max((len(r.label) for r in rows), default=10)
    height = nrows * (0.22 * len(rows) + 1.0) + 0.9
    fig = figure(label_in + 1.8 * ncols + 0.5, height)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
    ref_styles: dict[str, Any] = {label: ("--", ":", "-.", "-")[k % 4] for k, label in enumerate(references)}
    for p, ax in enumerate(ax for line in axes for ax in line):
        if p >= len(panels):
            ax.set_visible(False)
            continue
        for i, row in enumerate(rows):
            value = row.values[p]
            if value is not None:
                ax.plot([value], [i], color=row.style.colour, marker=row.style.marker, linestyle="none",
                        markersize=6, label=row.label)
            if i and row.group != rows[i - 1].group:
                ax.axhline(i - 0.5, color="0.75", linewidth=0.6)
        for label, values in references.items():
            if values[p] is not None:
                ax.axvline(values[p], color=REFERENCE, linestyle=ref_styles[label], linewidth=1.0, label=label)
        seen = [v for r in rows for v in [r.values[p]] if v is not None]
        seen += [v for values in references.values() for v in [values[p]] if v is not None]
        if seen:
            ax.set_xlim(*limits(seen))
        ax.set_title(panels[p], fontsize="small")
        ax.set_xlabel(xlabel, fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.tick_params(labelsize="small")
        ax.grid(axis="y", alpha=0.25)
    first = axes[0][0]
    first.set_yticks(range(len(rows)), [r.label for r in rows])
    first.set_ylim(len(rows) - 0.5, -0.5)  # first run on top
    fig.suptitle(wrap(title, label_in + 1.8 * ncols), fontsize="medium")
    handles = [Line2D([], [], color="0.3", marker=s.marker, linestyle="none", label=text) for text, s in legend]
    handles += [Line2D([], [], color=REFERENCE, linestyle=ref_styles[label], label=label)
                for label in references]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)), fontsize="small")
    return fig
