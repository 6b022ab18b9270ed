"""The report's figures from hand-made runs: weave runs take their base method's colour and a marker per
pooling, rows grouped by base method; styles never repeat; a sweep through 0 on a log axis; subset std."""

from __future__ import annotations

import statistics
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from mergelab.experiment.store import Row  # noqa: E402
from mergelab.report import figures  # noqa: E402
from mergelab.report.dots import limits  # noqa: E402
from mergelab.report.style import (  # noqa: E402
    MARKERS,
    base_method,
    dot_styles,
    is_base_model,
    line_styles,
    palette,
    variant,
)
from mergelab.report.tables import subset_size_means, subset_size_stats  # noqa: E402

TASKS = ["a", "b"]


def fake(label: str, method: str, params: dict[str, Any] | None = None, hparams: dict[str, Any] | None = None,
         accuracy: tuple[float, float] = (0.6, 0.7), tasks: list[str] | None = None) -> Row:
    metrics = {"accuracy": dict(zip(TASKS, accuracy, strict=True)), "average": sum(accuracy) / 2}
    config = {"params": params or {}, "hparams": hparams or {}, "subset": "all", "swept": [],
              "tasks": tasks or TASKS, "eval_tasks": TASKS, "group": label}
    return Row(hash=label, experiment="x", kind="multitask", suite="s", method=method, label=label, config=config,
               status="ok", metrics=metrics, error=None, merge_seconds=None, eval_seconds=None, versions={},
               hardware={}, git_commit=None, command=None, created="2026-01-01T00:00:00+00:00")


def weave(inner: str, pooling: str | None, accuracy: tuple[float, float] = (0.6, 0.7)) -> Row:
    label = f"weave+{inner}" + (f" pooling={pooling}" if pooling else "")
    params = {"inner": inner, **({"pooling": pooling} if pooling else {})}
    return fake(label, "weave", params, {"inner": inner, "pooling": pooling or "average"}, accuracy)


def test_a_weave_run_belongs_to_its_inner_method_and_its_pooling_is_the_variant() -> None:
    assert base_method(weave("ties", "random")) == "ties" and variant(weave("ties", "random")) == "weave, pooling=random"
    assert variant(weave("tsv", None)) == "weave, pooling=average"  # the default, as the run resolved it
    assert base_method(fake("ties", "ties")) == "ties" and variant(fake("ties", "ties")) == ""
    assert is_base_model(fake("base", "task_arithmetic", {"scaling": 0.0}))
    assert is_base_model(fake("zero-shot", "task_arithmetic", {}, {"scaling": 0}))
    assert not is_base_model(fake("ta", "task_arithmetic", {}, {"scaling": 0.3}))
    assert not is_base_model(fake("wa", "weight_average", {"scaling": 0.0}))


def test_weave_dots_share_the_base_methods_colour_grouped_and_marked_by_pooling() -> None:
    runs = [fake("task_arithmetic", "task_arithmetic"), fake("ties", "ties"), weave("task_arithmetic", "average"),
            weave("ties", "magmax"), weave("task_arithmetic", "random"), weave("task_arithmetic", "magmax"),
            weave("ties", None), fake("base", "task_arithmetic", {"scaling": 0.0}, accuracy=(0.5, 0.55))]
    colours = palette(base_method(r) for r in runs)
    fig = figures.tasks_figure("t", TASKS, runs, colours)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["average", *TASKS]
    order = ["task_arithmetic", "weave+task_arithmetic pooling=average", "weave+task_arithmetic pooling=random",
             "weave+task_arithmetic pooling=magmax", "ties", "weave+ties pooling=magmax", "weave+ties"]
    assert [t.get_text() for t in panels[0].get_yticklabels()] == order  # a row per run, by base method
    dots = {line.get_label(): line for line in panels[1].get_lines() if line.get_marker() != "None"}
    assert set(dots) == set(order)  # the base model is no row ...
    reference = [line for line in panels[1].get_lines() if line.get_label().startswith("base model")]
    assert [list(line.get_xdata()) for line in reference] == [[0.5, 0.5]]  # ... but the reference line
    for label, line in dots.items():
        assert line.get_color() == colours[label.split("+")[-1].split()[0]]
    markers = {label: line.get_marker() for label, line in dots.items()}
    assert markers["task_arithmetic"] == markers["ties"] == "o"
    assert markers["weave+task_arithmetic pooling=average"] == markers["weave+ties"]
    assert markers["weave+task_arithmetic pooling=magmax"] == markers["weave+ties pooling=magmax"]
    assert len(set(markers[label] for label in order[:4])) == 4
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "the method itself", "weave, pooling=average", "weave, pooling=random", "weave, pooling=magmax",
        "base model (run 'base')"]


def test_styles_never_repeat() -> None:
    colours = palette(["a", "b"])
    lines = line_styles(["a"] * 48, colours)
    assert len({(s.marker, s.linestyle) for s in lines}) == 48  # greyscale: marker and linestyle alone
    clash = dot_styles([("a", ""), ("a", ""), ("b", ""), ("a", "weave")], colours)
    assert len({(s.colour, s.marker) for s in clash}) == 4
    assert [s.marker for s in clash[:3]] == [MARKERS[0], MARKERS[1], MARKERS[0]]


def test_a_sweep_through_zero_is_drawn_on_a_log_axis_with_a_linear_stretch_and_the_baselines() -> None:
    groups = {"cart": ([0.0, 0.02, 0.08, 1.0], [0.49, 0.59, 0.55, 0.49])}
    baselines = [fake("weight_average", "weight_average", accuracy=(0.49, 0.49)), fake("ties", "ties")]
    fig = figures.sweep_figure("t", "rank_ratio", groups, {"cart": fake("cart", "cart")}, baselines,
                               palette(["cart", "ties"]), 2)
    (ax,) = fig.axes
    assert ax.get_xscale() == "symlog" and "log scale" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.02", "0.08", "1"]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["weight_average (0.4900)", "ties (0.6500)", "cart"]
    positive = figures.sweep_figure("t", "scaling", {"ta": ([0.1, 1.0, 2.0], [0.4, 0.5, 0.45])}, {}, [], {}, 2)
    assert positive.axes[0].get_xscale() == "log"  # spans a decade and more
    narrow = figures.sweep_figure("t", "scaling", {"ta": ([0.3, 0.6, 1.0], [0.4, 0.5, 0.45])}, {}, [], {}, 2)
    assert narrow.axes[0].get_xscale() == "linear"


def test_subset_stats_give_mean_std_and_count_per_size() -> None:
    rows = [fake("m", "m", accuracy=a, tasks=t) for a, t in
            [((0.5, 0.7), ["a", "b"]), ((0.7, 0.7), ["a", "c"]), ((0.4, 0.4), ["a", "b", "c"])]]
    stats = subset_size_stats(rows)
    assert stats["m"][2] == pytest.approx((0.65, statistics.pstdev([0.6, 0.7]), 2))
    assert stats["m"][3] == (0.4, 0.0, 1)
    assert subset_size_means(rows) == {"m": {2: (stats["m"][2][0], 2), 3: (0.4, 1)}}


def test_a_panel_zooms_to_its_values() -> None:
    low, high = limits([0.81, 0.83])
    assert 0.8 < low < 0.81 and 0.83 < high < 0.84
    low, high = limits([0.5, 0.5])  # one value: half a point each side
    assert (low, high) == pytest.approx((0.495, 0.505))
