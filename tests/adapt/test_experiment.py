"""Adapted runs in experiment configs: the ``adapt:`` options are checked when the config is read and are part of
the adapted runs' hashes only; a run stores the learned coefficients and the trace, which rebuild its model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mergelab.errors import MergelabError
from mergelab.experiment.config import parse_config


def tasks(suite: str, quick: bool) -> list[str]:
    return ["a", "b", "c"]


def hashes(adapt: dict[str, Any] | None) -> dict[str, str]:
    raw: dict[str, Any] = {"name": "x", "suites": ["s"], "methods": ["task_arithmetic", "adamerging",
                                                                   {"method": "cart_pp", "label": "c"}]}
    if adapt is not None:
        raw["adapt"] = adapt
    return {run.label: run.hash for run in parse_config(raw, suite_tasks=tasks).runs}


def test_adapt_options_are_in_the_adapted_runs_hashes_only() -> None:
    plain, defaults, longer = hashes(None), hashes({}), hashes({"steps": 10})
    assert plain == defaults  # no adapt: mapping = every default
    assert hashes({"steps": 500, "batches": 1}) == plain  # the defaults spelled out: the same runs
    assert longer["task_arithmetic"] == plain["task_arithmetic"]
    assert longer["adamerging"] != plain["adamerging"] and longer["c"] != plain["c"]


def test_task_arithmetic_hash_is_what_it_was_before_adapt_options_existed() -> None:
    # the hash of a data-free run is sha256 of its key, which has no "adapt" entry
    run = parse_config({"name": "x", "suites": ["s"], "methods": ["task_arithmetic"], "adapt": {"steps": 3}},
                       suite_tasks=tasks).runs[0]
    assert "adapt" not in run.key() and run.adapt == {}


@pytest.mark.parametrize("adapt, message", [
    ({"step": 3}, "unknown option"), ({"steps": -1}, "steps >= 0"), ({"unlabelled": "mine"}, "test or train"),
    ({"clamp": "yes"}, "true or false"), ({"deltas_dtype": "int8"}, "deltas_dtype"), ([1], "mapping")])
def test_bad_adapt_options_are_config_errors(adapt: Any, message: str) -> None:
    with pytest.raises(MergelabError, match=message) as err:
        parse_config({"name": "x", "suites": ["s"], "methods": ["adamerging"], "adapt": adapt}, suite_tasks=tasks)
    assert "adapt" in str(err.value)


def test_adapt_is_refused_where_nothing_adapts() -> None:
    with pytest.raises(MergelabError, match="not used by kind 'continual'"):
        parse_config({"name": "x", "kind": "continual", "suites": ["s"], "methods": ["opcm"], "adapt": {"steps": 3}},
                     suite_tasks=tasks)


def test_an_adapted_run_stores_coefficients_that_rebuild_it(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import mergelab
    from mergelab.experiment import run
    from mergelab.experiment.store import Store
    from tests.adapt.tiny import build

    zoo = build(tmp_path / "zoo")
    config = {"name": "tta", "suites": ["tinyadapt"], "db": str(tmp_path / "tta.sqlite"),
              "methods": [{"method": "adamerging", "params": {"granularity": "block"}}],
              "adapt": {"steps": 2, "batch_size": 4, "eval_every": 1}}
    summary = run(config, build_zoo=lambda *a, **k: zoo, suite_tasks=lambda s, q: [t.name for t in zoo.tasks],
                  progress=False)
    assert summary.ran == 1 and summary.failed == 0, summary.errors
    with Store(tmp_path / "tta.sqlite") as store:
        (row,) = store.rows()
    adapted = row.metrics["adapt"]
    assert [e["step"] for e in adapted["trace"] if "accuracy" in e] == [0, 1, 2]
    assert len([e for e in adapted["trace"] if "entropy" in e]) == 2
    assert row.config["adapt"]["steps"] == 2 and row.config["adapt"]["batches"] == 1
    rebuilt = mergelab.merge("adamerging", zoo.base, [zoo.experts[t] for t in adapted["coefficients"]["tasks"]],
                             coefficients=adapted["coefficients"], progress=False)
    again = mergelab.adapt("adamerging", zoo, steps=2, batch_size=4, granularity="block", eval_every=-1,
                           cache_dir=zoo.path.parents[2])
    assert adapted["coefficients"]["coefficients"] == again.coefficients
    assert all(torch.equal(rebuilt[k], again.merged[k]) for k in rebuilt)

    from mergelab.report import write_report

    text = write_report(tmp_path / "tta.sqlite", tmp_path / "report" / "r.md").read_text()
    averages = [e["average"] for e in adapted["trace"] if "average" in e]
    assert "| run | 0 | 1 | 2 |" in text
    assert f"| adamerging | {averages[0]:.4f} | {averages[1]:.4f} | {averages[2]:.4f} |" in text
    first = next(e["entropy"] for e in adapted["trace"] if "entropy" in e)
    assert f"| adamerging | 2 | {first:.3f} |" in text
    assert (tmp_path / "report" / "r_files").is_dir() or any((tmp_path / "report").rglob("*_adapt.png"))
