"""Report rendering from a tiny database filled by real runs (tiny zoo, deterministic scorer): Markdown
tables with the stored numbers, valid PNG plots for bars, sweeps, subsets, held-out tasks, accuracy matrices
and the cosine heatmap."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from mergelab.errors import MergelabError  # noqa: E402
from mergelab.experiment import Store, run  # noqa: E402
from mergelab.report import write_report  # noqa: E402
from tests.experiment.tiny import TASKS, Scorer, Zoos  # noqa: E402

CONFIGS = [
    {"name": "mt", "suites": ["tiny"], "tasks": ["all", {"size": 2}, {"size": 3}],
     "methods": ["weight_average", {"method": "task_arithmetic", "label": "TA", "sweep": {"scaling": [0.3, 0.6, 1.0]}},
                 {"method": "cart", "params": {"scaling": 1.0}, "sweep": {"rank_ratio": [0.2, 0.5]}}]},
    {"name": "dg", "kind": "domain_generalization", "suites": ["tiny"], "methods": ["task_arithmetic"]},
    {"name": "cl", "kind": "continual", "suites": ["tiny"], "orders": ["identity", {"random": 2, "seed": 0}],
     "methods": ["swa", "opcm"]},
    {"name": "cos", "kind": "similarity", "suites": ["tiny"]},
]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("report")
    zoos = Zoos(tmp / "zoo")
    for raw in CONFIGS:
        run(raw, evaluate=Scorer(), build_zoo=zoos.build, suite_tasks=zoos.tasks, db=tmp / "r.sqlite",
            progress=False, command=f"mergelab experiment {raw['name']}.yaml")
    return tmp / "r.sqlite", write_report(tmp / "r.sqlite", tmp / "out" / "report.md")


def test_markdown_holds_the_stored_numbers(report: tuple[Path, Path]) -> None:
    db, out = report
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


def test_plots_are_valid_pngs_linked_from_the_markdown(report: tuple[Path, Path]) -> None:
    _, out = report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", out.read_text())
    names = {Path(link).name for link in links}
    assert {"mt_tiny_tasks.png", "mt_tiny_sweep_scaling.png", "mt_tiny_sweep_rank_ratio.png", "mt_tiny_subsets.png",
            "mt_tiny_subsets_normalised.png", "dg_tiny_heldout.png", "cl_tiny_steps.png", "cl_tiny_swa_matrix.png", "cl_tiny_opcm_matrix.png",
            "cos_tiny_cosine.png"} <= names
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
        report: tuple[Path, Path], tmp_path: Path) -> None:
    import os

    from mergelab.io import leftovers

    db, _ = report
    out = tmp_path / "again.md"
    pid, start = os.getpid(), leftovers._start_ticks(os.getpid()) or 0
    killed = tmp_path / f".again.md.mergelab-tmp-{leftovers._machine()}-{leftovers._boot()}-{pid}-{start + 1}-00"
    killed.write_text("half a report")
    write_report(db, out)
    assert out.read_text().startswith("#") and not killed.exists()
    assert not [p for p in tmp_path.iterdir() if ".mergelab-tmp-" in p.name]
