"""Loss-landscape figures in the style of CART's Figs. 4, 7 and 8 (arXiv:2412.12153) from the JSON that
``experiments/cart_landscape.py`` writes: filled contours of a loss over a plane's grid, with the merges'
trajectories and markers on top (theta_avg: black circle; CART at its table rank: blue star; other CART ranks:
black crosses; theta_0: black triangle; task arithmetic: black square; an expert: black star).

The JSON (one entry per plane)::

    {"multitask": {"x": [...], "y": [...], "points": {label: [x, y]}, "grid": {"j": [{task: {"loss", "accuracy"}}
                   per x]}}, "task <name>": {...}, "settings": {...}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from mergelab.report.plots import figure, wrap

CART_COLOUR = "#d62728"
TA_COLOUR = "#2ca02c"


def loss_surface(plane: Mapping[str, Any], tasks: Sequence[str]) -> list[list[float]]:
    """``surface[j][i]``: the sum over ``tasks`` of the loss at grid point ``(x[i], y[j])`` (NaN where not run)."""
    grid = plane.get("grid", {})
    out = []
    for j in range(len(plane["y"])):
        row = grid.get(str(j))
        out.append([sum(cell[t]["loss"] for t in tasks) for cell in row] if row else [math.nan] * len(plane["x"]))
    return out


def trajectory(points: Mapping[str, Sequence[float]], prefix: str, ranks: Sequence[float]) -> list[Sequence[float]]:
    """The plane coordinates of ``f"{prefix} rank={r}"`` for each rank, in rank order (missing ranks skipped)."""
    return [points[f"{prefix} rank={r}"] for r in ranks if f"{prefix} rank={r}" in points]


def _contour(ax: Any, plane: Mapping[str, Any], surface: list[list[float]]) -> Any:
    import numpy as np

    z = np.array(surface, dtype=float)
    finite = z[np.isfinite(z)]
    if finite.size == 0:
        return None
    levels = np.quantile(finite, np.linspace(0, 1, 13))  # evenly filled bands whatever the loss's range
    levels = np.unique(levels)
    if len(levels) < 2:
        levels = np.array([finite.min() - 1e-6, finite.max() + 1e-6])
    return ax.contourf(plane["x"], plane["y"], z, levels=levels, cmap="viridis")


def _path(ax: Any, coords: Sequence[Sequence[float]], colour: str, style: str, label: str | None) -> None:
    xs, ys = [c[0] for c in coords], [c[1] for c in coords]
    ax.plot(xs, ys, color=colour, linestyle=style, linewidth=1.4, label=label)
    if style == "-":  # arrows along the way, as the paper's red arrows (rank increasing)
        for (x0, y0), (x1, y1) in zip(coords[:-1], coords[1:], strict=True):
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                        arrowprops={"arrowstyle": "->", "color": colour, "linewidth": 1.2})


def _marker(ax: Any, xy: Sequence[float] | None, marker: str, colour: str, label: str) -> None:
    if xy is not None:
        ax.scatter([xy[0]], [xy[1]], marker=marker, s=90 if marker == "*" else 45, color=colour,
                   edgecolors="white" if colour == "black" else "black", linewidths=0.6, zorder=5, label=label)


def cart_markers(ax: Any, points: Mapping[str, Sequence[float]], settings: Mapping[str, Any], *, ta: bool) -> None:
    """Trajectories and markers of the multi-task plane (CART always; task arithmetic when ``ta``)."""
    ranks, star = settings["ranks"], settings.get("cart_rank", 0.08)
    others = iter(("--", ":", "-."))
    for lam in settings["cart_lambdas"]:
        style = "-" if lam == 1.0 else next(others, "--")
        _path(ax, trajectory(points, f"cart lambda={lam}", ranks), CART_COLOUR, style,
              f"CART, rank 0 -> full (lambda {lam})")
    crosses = [points[f"cart lambda=1.0 rank={r}"] for r in ranks if 0 < r < 1 and r != star]
    ax.scatter([c[0] for c in crosses], [c[1] for c in crosses], marker="x", color="black", s=30, zorder=5,
               label="CART, other ranks")
    _marker(ax, points.get("theta_avg"), "o", "black", "weight average")
    _marker(ax, points.get(f"cart lambda=1.0 rank={star}"), "*", "#1f77b4", f"CART ({star:.0%} rank)")
    if ta:
        _path(ax, trajectory(points, "ta", ranks), TA_COLOUR, "-", "task arithmetic, rank 0 -> full")
        line = [points["theta_0"]] + [points[f"ta lambda={lam}"] for lam in settings["ta_lambdas"]]
        _path(ax, line, TA_COLOUR, "--", "task arithmetic, lambda " + ", ".join(map(str, settings["ta_lambdas"])))
        _marker(ax, points.get("theta_0"), "^", "black", "pre-trained")
        _marker(ax, points.get("ta rank=1.0"), "s", "black", f"task arithmetic (lambda {settings['ta_scaling']})")


def _task_panels(tasks: Sequence[str], title: str, draw: Any) -> Any:
    """A panel per task, 4 to a row: ``draw(fig, ax, task)`` fills each; the first panel's legend goes right of
    them all."""
    cols = 4
    rows = math.ceil(len(tasks) / cols)
    width = 3.2 * cols + 2.6
    fig = figure(width, 2.9 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for index, task in enumerate(tasks):
        draw(fig, axes[index // cols][index % cols], task)
    for index in range(len(tasks), rows * cols):
        axes[index // cols][index % cols].set_axis_off()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small")
    fig.suptitle(wrap(title, width), fontsize="medium")
    return fig


def _loss_panel(fig: Any, ax: Any, plane: Mapping[str, Any], task: str) -> None:
    filled = _contour(ax, plane, loss_surface(plane, [task]))
    if filled is not None:
        fig.colorbar(filled, ax=ax, label="loss", format="%.2f")
    ax.set_title(task, fontsize="small")


def task_figure(data: Mapping[str, Any], tasks: Sequence[str]) -> Any:
    """Fig. 4: each task's loss on the multi-task plane, CART's trajectories on top."""
    plane, settings = data["multitask"], data["settings"]

    def draw(fig: Any, ax: Any, task: str) -> None:
        _loss_panel(fig, ax, plane, task)
        cart_markers(ax, plane["points"], settings, ta=False)

    return _task_panels(tasks, "MT8 (MiniLM): each task's test loss on the plane of CART's trajectory (first two "
                        "principal directions around the weight average)", draw)


def multitask_figure(data: Mapping[str, Any], tasks: Sequence[str]) -> Any:
    """Fig. 7: the multi-task loss (sum over tasks) with CART's and task arithmetic's trajectories."""
    plane, settings = data["multitask"], data["settings"]
    fig = figure(9.0, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    filled = _contour(ax, plane, loss_surface(plane, tasks))
    if filled is not None:
        fig.colorbar(filled, ax=ax, label=f"sum of the {len(tasks)} tasks' test losses", format="%.1f")
    cart_markers(ax, plane["points"], settings, ta=True)
    ax.set_xlabel("first principal direction")
    ax.set_ylabel("second principal direction")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right center", fontsize="small")
    fig.suptitle(wrap("MT8 (MiniLM): multi-task loss around the weight average, CART vs task arithmetic", 9.0),
                 fontsize="medium")
    return fig


def expert_figure(data: Mapping[str, Any], tasks: Sequence[str]) -> Any:
    """Fig. 8: per task, its loss on the plane through its expert, CART and task arithmetic."""

    def draw(fig: Any, ax: Any, task: str) -> None:
        plane = data.get(f"task {task}")
        if plane is None:  # not run yet
            ax.set_title(f"{task} (not run)", fontsize="small")
            return
        _loss_panel(fig, ax, plane, task)
        points = plane["points"]
        _marker(ax, points.get(f"expert {task}"), "*", "black", "the task's expert")
        _marker(ax, points.get("cart"), "*", "#1f77b4", "CART")
        _marker(ax, points.get("ta"), "s", "black", "task arithmetic")

    return _task_panels(tasks, "MT8 (MiniLM): each task's test loss on the plane through its expert, CART and task "
                        "arithmetic", draw)


def tasks_of(data: Mapping[str, Any]) -> list[str]:
    """The suite's tasks, in the suite's order."""
    return list(data["tasks"])
