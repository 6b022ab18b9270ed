"""The runner on real merges of tiny checkpoints with a deterministic scorer: one row per run, metrics equal
to a direct merge, resume after an interruption, reuse of finished runs, failed runs kept and retried on request,
continual (accuracy matrix, ACC, BWT), domain generalisation and similarity runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import mergelab
from mergelab.continual.rules.opcm import adaptive_lambda
from mergelab.experiment import Store, metrics, run
from tests.experiment.tiny import TASKS, Scorer, Zoos, score

GRID = {"name": "grid", "suites": ["tiny"], "tasks": ["all", {"size": 3}],
        "methods": [{"method": "task_arithmetic", "sweep": {"scaling": [0.3, 1.0]}}, "ties"]}  # 5 subsets x 3 = 15


def execute(raw: dict[str, Any], tmp_path: Path, scorer: Scorer, **kw: Any) -> Any:
    zoos = Zoos(tmp_path / "zoo")
    return run(raw, evaluate=scorer, build_zoo=zoos.build, suite_tasks=zoos.tasks, db=tmp_path / "r.sqlite",
               progress=False, command="test", **kw)


def test_one_row_per_run_with_metrics_of_the_real_merge(tmp_path: Path) -> None:
    scorer = Scorer()
    summary = execute(GRID, tmp_path, scorer)
    assert (summary.total, summary.ran, summary.failed, scorer.calls) == (15, 15, 0, 15)
    with Store(tmp_path / "r.sqlite") as store:
        rows = store.rows()
    assert len(rows) == 15 and all(r.status == "ok" for r in rows)
    (row,) = [r for r in rows if r.label == "ties" and r.config["subset"] == "all"]
    zoo = Zoos(tmp_path / "check").build("tiny")
    merged = mergelab.merge("ties", zoo.base, [zoo.experts[t] for t in TASKS])
    expected = {t: score(merged, zoo, t) for t in TASKS}
    assert row.metrics is not None
    assert row.metrics["accuracy"] == pytest.approx(expected)
    assert row.metrics["average"] == pytest.approx(sum(expected.values()) / 4)
    assert row.metrics["normalized"] == pytest.approx({t: a / 0.8 for t, a in expected.items()})
    assert row.config["hparams"]["density"] == 0.2  # resolved defaults recorded
    assert row.versions["mergelab"] == mergelab.__version__ and row.versions["torch"]
    assert row.hardware["device"] == "cpu" and row.command == "test" and row.merge_seconds is not None
    subset_rows = [r for r in rows if r.config["subset"] == "size=3"]
    assert all(set(r.metrics["accuracy"]) == set(r.config["tasks"]) for r in subset_rows if r.metrics)


def test_finished_runs_are_reused_not_recomputed(tmp_path: Path) -> None:
    execute(GRID, tmp_path, Scorer())
    again = Scorer()
    summary = execute(GRID, tmp_path, again)
    assert (summary.reused, summary.ran, again.calls) == (15, 0, 0)


def test_resume_after_keyboard_interrupt_runs_only_the_rest(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        execute(GRID, tmp_path, Scorer(fail_at=3, fail_with=KeyboardInterrupt()))
    with Store(tmp_path / "r.sqlite") as store:
        assert len(store.rows()) == 2  # the interrupted third run left no row
    rest = Scorer()
    summary = execute(GRID, tmp_path, rest)
    assert (summary.reused, summary.ran, rest.calls) == (2, 13, 13)


def test_failed_run_is_recorded_and_retried_only_when_asked(tmp_path: Path) -> None:
    summary = execute(GRID, tmp_path, Scorer(fail_at=3, fail_with=RuntimeError("scorer broke\nbadly")))
    assert (summary.ran, summary.failed) == (15, 1)
    with Store(tmp_path / "r.sqlite") as store:
        (failed,) = store.rows(status="failed")
    assert failed.error == "RuntimeError: scorer broke badly" and failed.metrics is None
    plain = Scorer()
    summary = execute(GRID, tmp_path, plain)
    assert (summary.skipped_failed, summary.ran, plain.calls) == (1, 0, 0)
    retry = Scorer()
    summary = execute(GRID, tmp_path, retry, retry_failed=True)
    assert (summary.ran, summary.failed, retry.calls) == (1, 0, 1)
    with Store(tmp_path / "r.sqlite") as store:
        assert [r.status for r in store.rows()] == ["ok"] * 15


def test_zoo_is_not_built_when_every_run_is_done(tmp_path: Path) -> None:
    execute(GRID, tmp_path, Scorer())
    zoos = Zoos(tmp_path / "zoo")
    run(GRID, evaluate=Scorer(), build_zoo=zoos.build, suite_tasks=zoos.tasks, db=tmp_path / "r.sqlite",
        progress=False)
    assert zoos.builds == 0


def test_continual_accuracy_matrix_acc_and_bwt(tmp_path: Path) -> None:
    raw = {"name": "cl", "kind": "continual", "suites": ["tiny"], "orders": ["identity", {"random": 1, "seed": 3}],
           "methods": ["swa", {"method": "opcm", "params": {"alpha": 0.5}}]}
    scorer = Scorer()
    summary = execute(raw, tmp_path, scorer)
    assert (summary.ran, summary.failed) == (4, 0)
    assert scorer.calls == 4 * len(TASKS)  # scored after every step
    with Store(tmp_path / "r.sqlite") as store:
        rows = store.rows()
    swa = next(r for r in rows if r.method == "swa" and r.config["subset"] == "identity")
    m = swa.metrics
    assert m is not None and m["order"] == TASKS
    assert [sum(a is not None for a in row) for row in m["matrix"]] == [1, 2, 3, 4]  # lower triangle
    assert m["matrix"][0][0] == pytest.approx(1.0)  # SWA of one expert is that expert
    assert m["acc"] == pytest.approx(metrics.acc(m["matrix"])) and m["bwt"] == pytest.approx(metrics.bwt(m["matrix"]))
    zoo = Zoos(tmp_path / "check").build("tiny")
    final = mergelab.merge("weight_average", zoo.base, [zoo.experts[t] for t in TASKS])  # SWA = the average
    assert m["matrix"][-1] == pytest.approx([score(final, zoo, t) for t in TASKS], abs=1e-6)
    assert len(m["step_seconds"]) == len(TASKS) and "lambda_t" not in m  # time per added model; no lambda_t
    # OPCM's Eq. (10) factor per step (its Fig. 7): lambda_1 = 1, and a fresh merger's scalars give the last one
    opcm = next(r for r in rows if r.method == "opcm" and r.config["subset"] == "identity").metrics
    assert opcm is not None and len(opcm["lambda_t"]) == len(TASKS) and opcm["lambda_t"][0] == pytest.approx(1.0)
    merger = mergelab.ContinualMerger("opcm", zoo.base, alpha=0.5)
    for t in TASKS:
        merger.add(zoo.experts[t], force=True)
    assert opcm["lambda_t"][-1] == pytest.approx(adaptive_lambda(merger.scalars, len(TASKS)))


def test_domain_generalization_scores_the_held_out_task(tmp_path: Path) -> None:
    raw = {"name": "dg", "kind": "domain_generalization", "suites": ["tiny"], "methods": ["task_arithmetic"]}
    execute(raw, tmp_path, Scorer())
    with Store(tmp_path / "r.sqlite") as store:
        rows = store.rows()
    assert [list(r.metrics["accuracy"]) for r in rows if r.metrics] == [[t] for t in TASKS]
    assert all(r.config["eval_tasks"][0] not in r.config["tasks"] for r in rows)


def test_routing_scores_each_task_with_its_own_routed_model(tmp_path: Path) -> None:
    raw = {"name": "rt", "kind": "routing", "suites": ["tiny"],
           "methods": [{"method": "cart", "params": {"rank_ratio": 0.5}}]}
    summary = execute(raw, tmp_path, Scorer())
    assert (summary.ran, summary.failed) == (len(TASKS), 0)
    with Store(tmp_path / "r.sqlite") as store:
        rows = store.rows()
    zoo = Zoos(tmp_path / "check").build("tiny")
    for index, task in enumerate(TASKS):
        row = next(r for r in rows if r.config["eval_tasks"] == [task])
        assert row.config["tasks"] == TASKS and row.config["params"]["route"] == index
        routed = mergelab.merge("cart", zoo.base, [zoo.experts[t] for t in TASKS], rank_ratio=0.5, route=index)
        assert row.metrics is not None and row.metrics["accuracy"][task] == pytest.approx(score(routed, zoo, task))


def test_similarity_run_stores_the_cosine_matrix(tmp_path: Path) -> None:
    scorer = Scorer()
    execute({"name": "cos", "kind": "similarity", "suites": ["tiny", "pair"]}, tmp_path, scorer)
    with Store(tmp_path / "r.sqlite") as store:
        rows = store.rows()
    assert scorer.calls == 0 and [r.suite for r in rows] == ["tiny", "pair"]
    cos = rows[0].metrics["cosine"] if rows[0].metrics else []
    assert len(cos) == 4 and all(cos[i][i] == 1.0 and cos[i][j] == cos[j][i] for i in range(4) for j in range(4))
