"""Runs and trials as Ray tasks on a local 2-CPU Ray instance: the grid's rows equal the local run's, a worker
killed mid-run loses nothing, a search with a fixed seed gives the same trials locally and on Ray."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mergelab.experiment import Store, run
from mergelab.search import search
from tests.experiment.tiny import Scorer, Zoos
from tests.search.tiny_search import SplitScorer

ray = pytest.importorskip("ray")
pytest.importorskip("optuna")

GRID = {"name": "grid", "suites": ["tiny"], "tasks": ["all", {"size": 3}],
        "methods": [{"method": "task_arithmetic", "sweep": {"scaling": [0.3, 1.0]}}, "ties"]}  # 15 runs


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    from mergelab.distributed import connect, disconnect

    started = connect("local:2")  # one instance for the module (starting one takes seconds)
    yield "local"
    disconnect(started)


def grid_rows(tmp_path: Path, ray_address: str | None, scorer: Any = None, **kw: Any) -> list[tuple[Any, ...]]:
    zoos = Zoos(tmp_path / "zoo")
    run(GRID, evaluate=scorer or Scorer(), build_zoo=zoos.build, suite_tasks=zoos.tasks, db=tmp_path / "r.sqlite",
        progress=False, command="test", ray=ray_address, **kw)
    with Store(tmp_path / "r.sqlite") as store:
        return sorted((r.hash, r.label, r.status, r.metrics, r.config) for r in store.rows())


def test_grid_on_ray_equals_the_local_run_row_for_row(tmp_path: Path, cluster: str) -> None:
    local = grid_rows(tmp_path / "local", None)
    remote = grid_rows(tmp_path / "ray", cluster)
    assert len(remote) == 15 and all(r[2] == "ok" for r in remote)
    assert remote == local


def test_a_worker_killed_mid_run_loses_nothing(tmp_path: Path, cluster: str) -> None:
    marker = tmp_path / "died"
    local = grid_rows(tmp_path / "local", None)
    remote = grid_rows(tmp_path / "ray", cluster, scorer=SplitScorer(die_once=marker))
    assert marker.exists()  # a worker did die, and its task was retried
    assert [r[:2] for r in remote] == [r[:2] for r in local] and all(r[2] == "ok" for r in remote)


def test_a_lost_run_is_stored_as_failed_and_filled_in_by_a_rerun(tmp_path: Path, cluster: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import mergelab.distributed

    monkeypatch.setattr(mergelab.distributed, "MAX_RETRIES", 0)
    marker = tmp_path / "died"
    rows = grid_rows(tmp_path / "ray", cluster, scorer=SplitScorer(die_once=marker))
    failed = [r for r in rows if r[2] == "failed"]
    assert len(rows) == 15 and len(failed) >= 1  # the lost run (and any that shared its worker) is recorded
    monkeypatch.undo()
    rows = grid_rows(tmp_path / "ray", cluster, retry_failed=True)
    assert len(rows) == 15 and all(r[2] == "ok" for r in rows)
    assert rows == grid_rows(tmp_path / "local", None)


def test_search_with_a_fixed_seed_gives_the_same_trials_on_ray(tmp_path: Path, cluster: str) -> None:
    kw: dict[str, Any] = {"space": {"scaling": "0.05:1.5:0.05", "density": [0.1, 0.3, 0.5]}, "strategy": "tpe",
                          "trials": 12, "seed": 5, "batch": 4, "progress": False}

    def once(folder: Path, address: str | None) -> Any:
        zoos = Zoos(folder / "zoo")
        return search("ties", "tiny", build_zoo=zoos.build, suite_tasks=zoos.tasks, evaluate=SplitScorer(),
                      db=folder / "s.sqlite", ray=address, **kw)

    local, remote = once(tmp_path / "local", None), once(tmp_path / "ray", cluster)
    assert [t.params for t in remote.trials] == [t.params for t in local.trials]
    assert [t.score for t in remote.trials] == pytest.approx([t.score for t in local.trials], abs=1e-9)
    assert remote.best_params == local.best_params
    assert remote.test["accuracy"] == pytest.approx(local.test["accuracy"], abs=1e-9)
