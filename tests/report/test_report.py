"""Report rendering from a tiny database filled by real runs (tiny zoo, deterministic scorer): Markdown
tables with the stored numbers, valid PNG plots for per-task dots, sweeps, subsets, held-out tasks, accuracy
matrices and the cosine heatmap; each figure, as drawn, holds one series per run or group of the data, no two
series alike (colour and marker, and marker and linestyle for lines, so greyscale too), legends outside."""

from __future__ import annotations

import re
import statistics
import struct
from pathlib import Path
from typing import Any, NamedTuple

import pytest

pytest.importorskip("matplotlib")

from mergelab.errors import MergelabError  # noqa: E402
from mergelab.experiment import Store, run  # noqa: E402
from mergelab.report import plots, write_report  # noqa: E402
from tests.experiment.tiny import TASKS, Scorer, Zoos  # noqa: E402

CONFIGS = [
    {"name": "mt", "suites": ["tiny"], "tasks": ["all", {"size": 2}, {"size": 3}],
     "methods": ["weight_average", {"method": "task_arithmetic", "label": "TA", "sweep": {"scaling": [0.3, 0.6, 1.0]}},
                 {"method": "cart", "params": {"scaling": 1.0}, "sweep": {"rank_ratio": [0.2, 0.5]}}]},
    {"name": "dg", "kind": "domain_generalization", "suites": ["tiny"],
     "methods": ["task_arithmetic", "weight_average", {"method": "task_arithmetic", "label": "base",
                                                        "params": {"scaling": 0.0}}]},
    {"name": "cl", "kind": "continual", "suites": ["tiny"], "orders": ["identity", {"random": 2, "seed": 0}],
     "methods": ["swa", "opcm"]},
    {"name": "cls", "kind": "continual", "suites": ["tiny"], "orders": ["identity", {"random": 1, "seed": 1}],
     "methods": [{"method": "opcm", "sweep": {"alpha": [0.3, 0.7]}},
                 {"method": "continual_ta", "sweep": {"scaling": [0.3, 1.0]}}]},
    {"name": "rt", "kind": "routing", "suites": ["tiny"],
     "methods": [{"method": "cart", "sweep": {"rank_ratio": [0.2, 1.0]}}]},
    {"name": "cos", "kind": "similarity", "suites": ["tiny"]},
]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


class Report(NamedTuple):
    db: Path
    out: Path
    figures: dict[str, Any]  # PNG name: the Figure as saved


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    tmp = tmp_path_factory.mktemp("report")
    zoos = Zoos(tmp / "zoo")
    for raw in CONFIGS:
        run(raw, evaluate=Scorer(), build_zoo=zoos.build, suite_tasks=zoos.tasks, db=tmp / "r.sqlite",
            progress=False, command=f"mergelab experiment {raw['name']}.yaml")
    figures: dict[str, Any] = {}
    save = plots.save

    def keep(fig: Any, path: Path) -> Path:
        figures[path.name] = fig
        return save(fig, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "save", keep)
        out = write_report(tmp / "r.sqlite", tmp / "out" / "report.md")
    return Report(tmp / "r.sqlite", out, figures)


def test_markdown_holds_the_stored_numbers(report: Report) -> None:
    db, out, _ = report
    text = out.read_text()
    with Store(db) as store:
        rows = store.rows(status="ok")
    for name, kind in [("mt", "multitask"), ("dg", "domain generalization"), ("cl", "continual"),
                       ("cos", "similarity")]:
        assert f"## {name} ({kind})" in text
    wa = next(r for r in rows if r.label == "weight_average" and r.config["subset"] == "all")
    assert wa.metrics is not None
    line = next(row for row in text.splitlines() if row.startswith("| weight_average |"))
    assert line == "| weight_average | " + " | ".join(f"{wa.metrics['accuracy'][t]:.4f}" for t in TASKS) + \
        f" | {wa.metrics['average']:.4f} | {wa.metrics['normalized_average']:.4f} |"
    assert "Sweep of `scaling`" in text and "Sweep of `rank_ratio`" in text
    assert "| 2 tasks | 3 tasks |" in text.replace("| run ", "") or "2 tasks | 3 tasks" in text
    # subsets: the normalised table holds the mean normalised average of the size-2 subsets (CART Fig. 6's view)
    pairs = [r.metrics["normalized_average"] for r in rows
             if r.label == "weight_average" and r.config["subset"] != "all" and len(r.config["tasks"]) == 2]
    normalised = text[text.index("Task subsets: average normalised accuracy"):]
    wa_line = next(row for row in normalised.splitlines() if row.startswith("| weight_average |"))
    assert wa_line.startswith(f"| weight_average | {sum(pairs) / len(pairs):.4f} ({len(pairs)}) |")
    cl = [r for r in rows if r.experiment == "cl" and r.method == "swa"]
    mean_acc = sum(r.metrics["acc"] for r in cl if r.metrics) / 3
    assert re.search(rf"\| swa \| 3 \| {mean_acc:.4f} ± ", text)
    assert "mergelab experiment mt.yaml" in text and "git commit" in text


def test_plots_are_valid_pngs_linked_from_the_markdown(report: Report) -> None:
    _, out, figures = report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", out.read_text())
    names = {Path(link).name for link in links}
    assert {"mt_tiny_tasks.png", "mt_tiny_sweep_scaling.png", "mt_tiny_sweep_rank_ratio.png", "mt_tiny_subsets.png",
            "mt_tiny_subsets_normalised.png", "dg_tiny_heldout.png", "cl_tiny_steps.png", "cl_tiny_swa_matrix.png", "cl_tiny_opcm_matrix.png",
            "cos_tiny_cosine.png"} <= names
    assert names == set(figures)  # every figure drawn is linked, and saved where the link points
    for link in links:
        width, height = png_size(out.parent / link)
        assert width > 100 and height > 100


def test_failed_runs_are_listed_and_empty_database_refused(tmp_path: Path) -> None:
    zoos = Zoos(tmp_path / "zoo")
    run(CONFIGS[1], evaluate=Scorer(fail_at=1, fail_with=RuntimeError("boom")), build_zoo=zoos.build,
        suite_tasks=zoos.tasks, db=tmp_path / "r.sqlite", progress=False)
    text = write_report(tmp_path / "r.sqlite", tmp_path / "r.md").read_text()
    assert "## Failed runs" in text and "RuntimeError: boom" in text
    (tmp_path / "dbs").mkdir()
    with pytest.raises(MergelabError, match="no \\*.sqlite results database"):
        write_report(tmp_path / "dbs", tmp_path / "d.md")
    (tmp_path / "r.sqlite").rename(tmp_path / "dbs" / "r.sqlite")  # a folder of databases
    assert "RuntimeError: boom" in write_report(tmp_path / "dbs", tmp_path / "d.md").read_text()
    Store(tmp_path / "empty.sqlite").close()
    with pytest.raises(MergelabError, match="no runs stored"):
        write_report(tmp_path / "empty.sqlite", tmp_path / "e.md")
    assert not (tmp_path / "e.md").exists()


def test_a_report_removes_what_a_killed_report_left_and_leaves_no_temporary(
        report: Report, tmp_path: Path) -> None:
    import os

    from mergelab.io import leftovers

    db = report.db
    out = tmp_path / "again.md"
    pid, start = os.getpid(), leftovers._start_ticks(os.getpid()) or 0
    killed = tmp_path / f".again.md.mergelab-tmp-{leftovers._machine()}-{leftovers._boot()}-{pid}-{start + 1}-00"
    killed.write_text("half a report")
    write_report(db, out)
    assert out.read_text().startswith("#") and not killed.exists()
    assert not [p for p in tmp_path.iterdir() if ".mergelab-tmp-" in p.name]


def _ok(db: Path, experiment: str) -> list[Any]:
    with Store(db) as store:
        return [r for r in store.rows(status="ok") if r.experiment == experiment]


def _style(handle: Any) -> tuple[str, str, str]:
    """(colour, marker, linestyle) of a legend handle: a line, or an error-bar line's data line."""
    from matplotlib.colors import to_hex
    from matplotlib.container import ErrorbarContainer

    line = handle.lines[0] if isinstance(handle, ErrorbarContainer) else handle
    return to_hex(line.get_color()), str(line.get_marker()), str(line.get_linestyle())


def _series(ax: Any) -> dict[str, Any]:
    handles, labels = ax.get_legend_handles_labels()
    assert len(set(labels)) == len(labels)
    return dict(zip(labels, handles, strict=True))


def _panels(fig: Any) -> list[Any]:
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def test_no_two_series_look_alike_legends_sit_outside_the_data_and_titles_fit(report: Report) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for name, fig in report.figures.items():
        canvas = FigureCanvasAgg(fig)  # lays the figure out as saved
        canvas.draw()
        renderer = canvas.get_renderer()
        axes = _panels(fig)
        for ax in axes:
            assert ax.get_legend() is None, name  # a legend inside an axes covers data: only figure legends
            styles = [_style(h) for h in _series(ax).values()]
            assert len(set(styles)) == len(styles), name
            lines = [(marker, ls) for _, marker, ls in styles if ls != "None"]
            assert len(set(lines)) == len(lines), name  # lines differ without colour: greyscale
            dots = [(colour, marker) for colour, marker, ls in styles if ls == "None"]
            assert len(set(dots)) == len(dots), name
            title = ax.title.get_window_extent(renderer)
            assert title.x0 >= 0 and title.x1 <= fig.bbox.x1, name  # not cut off
        for legend in fig.legends:
            box = legend.get_window_extent(renderer)
            assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in axes), name


def test_per_task_dots_have_a_panel_per_task_and_a_row_per_run(report: Report) -> None:
    rows = [r for r in _ok(report.db, "mt") if r.config["subset"] == "all" and not r.config["swept"]]
    panels = _panels(report.figures["mt_tiny_tasks.png"])
    assert [ax.get_title() for ax in panels] == ["average", *TASKS]
    for p, ax in enumerate(panels):
        series = _series(ax)
        assert set(series) == {r.label for r in rows}
        for r in rows:
            m = r.metrics or {}
            assert series[r.label].get_xdata()[0] == (m["average"] if p == 0 else m["accuracy"][TASKS[p - 1]])


def test_held_out_dots_draw_the_base_model_as_the_reference_on_a_zoomed_axis(report: Report) -> None:
    rows = _ok(report.db, "dg")
    runs = {(r.label, r.config["eval_tasks"][0]): (r.metrics or {})["accuracy"][r.config["eval_tasks"][0]] for r in rows}
    panels = _panels(report.figures["dg_tiny_heldout.png"])
    assert [ax.get_title() for ax in panels] == ["mean", *TASKS]
    for task, ax in zip(TASKS, panels[1:], strict=True):
        series = _series(ax)
        reference = "base model (run 'base')"
        assert set(series) == {"task_arithmetic", "weight_average", reference}  # the base run is no dot row
        assert list(series[reference].get_xdata()) == [runs["base", task]] * 2  # a vertical line at its score
        for label in ("task_arithmetic", "weight_average"):
            assert series[label].get_xdata()[0] == runs[label, task]
        values = [runs[label, task] for label in ("task_arithmetic", "weight_average", "base")]
        low, high = ax.get_xlim()
        assert low > 0.0 and high - low <= 1.3 * (max(values) - min(values)) + 0.011  # zoomed to the data


def test_sweeps_are_lines_with_the_unswept_runs_as_labelled_horizontal_lines(report: Report) -> None:
    rows = [r for r in _ok(report.db, "mt") if r.config["subset"] == "all"]
    baselines = {f"{r.label} ({(r.metrics or {})['average']:.4f})" for r in rows if not r.config["swept"]}
    for param, group, scale in (("rank_ratio", "cart", "log"), ("scaling", "TA", "linear")):
        (ax,) = _panels(report.figures[f"mt_tiny_sweep_{param}.png"])
        series = _series(ax)
        assert set(series) == {group} | baselines and ax.get_xscale() == scale
        swept = sorted((r.config["params"][param], (r.metrics or {})["average"]) for r in rows
                       if r.config.get("group") == group)
        assert list(series[group].get_xdata()) == [x for x, _ in swept]
        assert list(series[group].get_ydata()) == [y for _, y in swept]
        for label in baselines:
            assert len(set(series[label].get_ydata())) == 1 and series[label].get_marker() == "None"


def test_subsets_plot_mean_and_std_over_subsets_up_to_all_tasks(report: Report) -> None:
    rows = _ok(report.db, "mt")
    (ax,) = _panels(report.figures["mt_tiny_subsets.png"])
    series = _series(ax)
    labels = list(dict.fromkeys(r.label for r in rows if r.config["subset"] != "all"))
    assert list(series) == labels
    assert [t for t in ax.get_xticks()] == [2, 3, len(TASKS)] and "mean ± std" in ax.get_ylabel()
    for label, handle in series.items():
        by_size: dict[int, list[float]] = {}
        for r in rows:
            if r.label == label:
                by_size.setdefault(len(r.config["tasks"]), []).append((r.metrics or {})["average"])
        line, _, (bars,) = handle.lines
        assert [round(x) for x in line.get_xdata()] == sorted(by_size)
        assert list(line.get_ydata()) == pytest.approx([statistics.fmean(by_size[n]) for n in sorted(by_size)])
        halves = [(seg[1][1] - seg[0][1]) / 2 for seg in bars.get_segments()]
        assert halves == pytest.approx([statistics.pstdev(by_size[n]) for n in sorted(by_size)])


def test_continual_steps_are_the_mean_over_orders_with_a_min_max_band(report: Report) -> None:
    rows = _ok(report.db, "cl")
    (ax,) = _panels(report.figures["cl_tiny_steps.png"])
    assert "tiny" in ax.get_title() and "band: min to max" in ax.get_ylabel()
    series = _series(ax)
    assert list(series) == ["swa (3 orders)", "opcm (3 orders)"]
    assert len(ax.collections) == 2  # one band per method
    for (label, line), band in zip(series.items(), ax.collections, strict=True):
        curves = [(r.metrics or {})["step_average"] for r in rows if r.label == label.split()[0]]
        assert list(line.get_ydata()) == pytest.approx([statistics.fmean(s) for s in zip(*curves, strict=True)])
        edges = {round(float(y), 9) for y in band.get_paths()[0].vertices[:, 1]}
        assert {round(min(s), 9) for s in zip(*curves, strict=True)} <= edges
        assert {round(max(s), 9) for s in zip(*curves, strict=True)} <= edges


def test_accuracy_matrix_rows_are_the_steps_and_columns_the_tasks_of_the_drawn_order(report: Report) -> None:
    from mergelab.report.figures import matrix_figure

    rows = [r for r in _ok(report.db, "cl") if r.label == "swa"]
    identity = next(r for r in rows if r.config["subset"] == "identity")
    shuffled = next(r for r in rows if r.metrics and r.metrics["order"] != identity.metrics["order"])
    for drawn, fig in ((identity, report.figures["cl_tiny_swa_matrix.png"]), (shuffled, matrix_figure("t", shuffled))):
        m = drawn.metrics or {}
        (ax,) = _panels(fig)
        assert [t.get_text() for t in ax.get_yticklabels()] == [f"{k}. {t}" for k, t in enumerate(m["order"], 1)]
        assert [t.get_text() for t in ax.get_xticklabels()] == m["order"]
        cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
        assert cells == {(i, j): f"{v:.2f}" for i, row in enumerate(m["matrix"]) for j, v in enumerate(row)
                         if v is not None}
        last = len(m["order"]) - 1  # the last row is the final model: column j is the task order[j]
        assert [cells[last, j] for j in range(last + 1)] == [f"{m['accuracy'][t]:.2f}" for t in m["order"]]
    assert "identity order" in _panels(report.figures["cl_tiny_swa_matrix.png"])[0].get_title().replace("\n", " ")


def test_continual_sweeps_show_acc_mean_and_std_over_orders(report: Report) -> None:
    rows = _ok(report.db, "cls")
    text = report.out.read_text()
    section = text[text.index("## cls (continual)"):]
    for param, group, values in (("alpha", "opcm", (0.3, 0.7)), ("scaling", "continual_ta", (0.3, 1.0))):
        table = section[section.index(f"Sweep of `{param}`"):]
        for x in values:
            accs = [r.metrics["acc"] for r in rows if r.method == group and r.config["params"][param] == x]
            assert len(accs) == 2  # two orders
            cell = f"{statistics.fmean(accs):.4f} ± {statistics.pstdev(accs):.4f}"
            assert f"| {x:.4f} | {cell} |" in table
        (ax,) = _panels(report.figures[f"cls_tiny_sweep_{param}.png"])
        assert list(_series(ax)) == [group]


def test_sweeps_per_task_have_a_panel_per_task_with_the_stored_accuracies(report: Report) -> None:
    rows = [r for r in _ok(report.db, "mt") if r.config["subset"] == "all" and "rank_ratio" in r.config["swept"]]
    panels = _panels(report.figures["mt_tiny_sweep_rank_ratio_tasks.png"])
    assert [ax.get_title() for ax in panels] == TASKS
    for ax, task in zip(panels, TASKS, strict=True):
        (line,) = _series(ax).values()  # one sweep of rank_ratio
        expected = sorted((r.config["params"]["rank_ratio"], r.metrics["accuracy"][task]) for r in rows)
        assert list(line.get_xdata()) == [x for x, _ in expected]
        assert list(line.get_ydata()) == pytest.approx([y for _, y in expected])


def test_routing_shows_each_routed_task_and_the_mean_against_the_swept_rank(report: Report) -> None:
    rows = _ok(report.db, "rt")
    text = report.out.read_text()
    section = text[text.index("## rt (routing)"):]
    assert "scored with the model routed to it" in section
    table = section[section.index("Sweep of `rank_ratio`"):]
    for x in (0.2, 1.0):
        accs = [r.metrics["accuracy"][r.config["eval_tasks"][0]] for r in rows if r.config["params"]["rank_ratio"] == x]
        assert len(accs) == len(TASKS)
        assert f"| {x:.4f} | {sum(accs) / len(accs):.4f} |" in table
    (ax,) = _panels(report.figures["rt_tiny_routed_sweep_rank_ratio.png"])
    assert list(_series(ax)) == ["cart"]
    assert "rt_tiny_routed.png" in report.figures


def test_opcm_lambda_t_is_drawn_per_step_against_sqrt_t(report: Report) -> None:
    rows = [r for r in _ok(report.db, "cl") if r.method == "opcm"]
    assert all(r.metrics and r.metrics["recorded"] == ["lambda_t"] for r in rows)
    (ax,) = _panels(report.figures["cl_tiny_recorded_lambda_t.png"])
    series = _series(ax)
    assert list(series) == ["opcm (3 orders)", "sqrt(t)"]  # swa records nothing
    mean = [statistics.fmean(s) for s in zip(*[r.metrics["lambda_t"] for r in rows], strict=True)]
    assert list(series["opcm (3 orders)"].get_ydata()) == pytest.approx(mean)
    assert list(series["sqrt(t)"].get_ydata()) == pytest.approx([t ** 0.5 for t in range(1, len(mean) + 1)])
    text = report.out.read_text()
    table = text[text.index("`lambda_t` after each step"):]
    assert "| opcm | " + " | ".join(f"{v:.3f}" for v in mean) + " |" in table
    assert "| sqrt(t) | 1.000 | 1.414 |" in table
