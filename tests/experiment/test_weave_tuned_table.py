"""experiments/weave_tuned.py --table: Table 1 rows are means over held-out tasks, hand-checked."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).parents[2] / "experiments" / "weave_tuned.py"


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("weave_tuned", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stored: dict[tuple[str | None, str], float] = {("a", "alone"): 0.30, ("b", "alone"): 0.50, ("a", "base"): 0.25, ("b", "base"): 0.45}

    def fake(setting: str, held_out: str | None, match: Any) -> float | None:
        # the matchers see a row with the method's label (lambda = 1) or the base row
        alone = match(type("Row", (), {"method": "ties", "label": "ties", "config": {}})())
        return stored.get((held_out, "alone" if alone else "base"))

    monkeypatch.setattr(module, "_stored_score", fake)
    return module


ENTRIES = [
    {"setting": "domain_generalization", "method": "ties", "held_out": "a", "lambda": 0.3, "validation": 0.6,
     "test": 0.40, "woven": 0.35, "per_task_best_lambda": {"b": 0.2, "c": 0.5}},
    {"setting": "domain_generalization", "method": "ties", "held_out": "b", "lambda": 1.0, "validation": 0.8,
     "test": 0.60, "woven": 0.62, "per_task_best_lambda": {"a": 0.9, "c": 0.4}},
]


def test_domain_generalisation_row_averages_the_held_out_tasks(script: ModuleType) -> None:
    row = script.table(ENTRIES, "domain_generalization").splitlines()[2]
    # lambda = 1: (0.30 + 0.50) / 2; tuned test (0.40 + 0.60) / 2; woven (0.35 + 0.62) / 2 = 0.485 -> -1.5 points;
    # 1.0 is the top of the paper's DG grid 0.1..1.0
    assert row == ("| ties | 0.4000 | 0.3-1 (grid edge) | 0.7000 | 0.5000 | 0.4850 | -1.5 points | 0.2-0.9 |")


def test_held_out_table_lists_base_then_tuned_and_woven(script: ModuleType) -> None:
    lines = script.held_out_table(ENTRIES).splitlines()
    assert lines[0] == "| held-out task | base | ties: tuned (lambda) | ties: woven |"
    assert lines[2:] == ["| a | 0.2500 | 0.4000 (0.3) | 0.3500 |", "| b | 0.4500 | 0.6000 (1) | 0.6200 |"]


def test_figure_two_has_a_panel_per_setting_and_method_with_every_task(script: ModuleType) -> None:
    pytest.importorskip("matplotlib")
    entries = [*ENTRIES, {"setting": "multitask", "method": "tsv", "held_out": None, "lambda": 1.9,
                          "validation": 0.6, "test": 0.6, "woven": 0.58, "per_task_best_lambda": {"a": 1.5, "b": 2.0}}]
    fig = script.best_lambda_figure(entries)
    drawn = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in drawn] == ["ties, 2 searches", "tsv"]  # DG row: ties; multitask row: tsv
    heights = [sum(patch.get_height() for patch in ax.patches) for ax in drawn]
    assert heights == [4, 2]  # DG pools both hold-outs' 2 tasks each
    dashed = [sorted(line.get_xdata()[0] for line in ax.lines) for ax in drawn]
    assert dashed == [[0.3, 1.0], [1.9]]  # every distinct tuned lambda
