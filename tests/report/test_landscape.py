"""The loss-landscape figures from a hand-made JSON: the surface sums the tasks' losses (NaN where a grid row is
not run), every trajectory is drawn once, no two series share colour and style, an unrun plane is marked."""

from __future__ import annotations

import math
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from mergelab.report.landscape import (  # noqa: E402
    expert_figure,
    loss_surface,
    multitask_figure,
    task_figure,
    trajectory,
)

TASKS = ["a", "b"]
RANKS = [0.0, 0.5, 1.0]
SETTINGS = {"ranks": RANKS, "cart_lambdas": [0.5, 1.0, 2.0], "cart_rank": 0.5, "ta_scaling": 0.3,
            "ta_lambdas": [0.125, 1.0]}


def cell(a: float, b: float) -> dict[str, dict[str, float]]:
    return {"a": {"loss": a, "accuracy": 0.5}, "b": {"loss": b, "accuracy": 0.5}}


def data(with_task_planes: bool = True) -> dict[str, Any]:
    points = {"theta_avg": [0.0, 0.0], "theta_0": [-1.0, 0.0], "ta rank=0.0": [-1.0, 0.0],
              "ta rank=0.5": [0.5, -0.2], "ta rank=1.0": [0.6, 0.0], "ta lambda=0.125": [0.0, 0.0],
              "ta lambda=1.0": [2.0, 0.1]}
    for lam in SETTINGS["cart_lambdas"]:
        points |= {f"cart lambda={lam} rank=0.0": [0.0, 0.0], f"cart lambda={lam} rank=0.5": [lam, lam / 2],
                   f"cart lambda={lam} rank=1.0": [0.0, 0.0]}
    plane = {"x": [-1.0, 0.0, 1.0], "y": [-1.0, 1.0], "points": points,
             "grid": {"0": [cell(1, 2), cell(2, 3), cell(3, 4)]}}  # row 1 not run yet
    out: dict[str, Any] = {"settings": SETTINGS, "tasks": TASKS, "multitask": plane}
    if with_task_planes:
        for task in TASKS:
            out[f"task {task}"] = {"x": [0.0, 1.0], "y": [0.0, 1.0], "grid": {"0": [cell(1, 1), cell(2, 2)],
                                                                            "1": [cell(3, 3), cell(4, 4)]},
                                   "points": {f"expert {task}": [0.0, 0.0], "cart": [1.0, 0.0], "ta": [0.5, 1.0]}}
    return out


def test_the_surface_sums_the_tasks_and_leaves_unrun_rows_empty() -> None:
    surface = loss_surface(data()["multitask"], TASKS)
    assert surface[0] == [3, 5, 7]
    assert all(math.isnan(v) for v in surface[1])
    assert loss_surface(data()["multitask"], ["b"])[0] == [2, 3, 4]


def test_trajectory_follows_the_ranks_in_order() -> None:
    points = data()["multitask"]["points"]
    assert trajectory(points, "cart lambda=2.0", RANKS) == [[0.0, 0.0], [2.0, 1.0], [0.0, 0.0]]


def _series(ax: Any) -> list[tuple[str, str, str]]:
    """(label, colour, line style or marker) of every labelled line and scatter."""
    from matplotlib.colors import to_hex

    out = [(line.get_label(), to_hex(line.get_color()), line.get_linestyle()) for line in ax.get_lines()]
    for coll in ax.collections:
        if coll.get_label().startswith("_"):
            continue
        marker = coll.get_paths()[0].vertices.tobytes().hex() if coll.get_paths() else ""  # the marker shape
        out.append((coll.get_label(), to_hex(coll.get_facecolor()[0]), marker))
    return out


def test_multitask_figure_draws_each_trajectory_once_and_no_two_series_look_alike() -> None:
    fig = multitask_figure(data(), TASKS)
    ax = fig.axes[0]
    series = _series(ax)
    labels = [s[0] for s in series]
    assert len(labels) == len(set(labels))
    lines = [s for s in series if s[0].startswith(("CART, rank", "task arithmetic, "))]
    assert len(lines) == 3 + 2  # one per CART lambda, task arithmetic's rank and lambda paths
    assert len({s[1:] for s in series}) == len(series)  # colour + style/marker unique
    assert "sum of the 2 tasks" in fig.axes[1].get_ylabel()  # the colour bar says what is drawn


def test_task_and_expert_figures_have_a_panel_per_task_and_mark_unrun_planes() -> None:
    fig = task_figure(data(), TASKS)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled == TASKS
    fig = expert_figure(data(with_task_planes=False), TASKS)
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["a (not run)", "b (not run)"]
    fig = expert_figure(data(), TASKS)
    panel = next(ax for ax in fig.axes if ax.get_title() == "a")
    assert {s[0] for s in _series(panel)} == {"the task's expert", "CART", "task arithmetic"}
