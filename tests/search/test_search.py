"""`mergelab.search.search` on the tiny zoo with a split-aware scorer: the chosen trial is the hand-computed
argmax of the validation score, the test score is reported apart, trials are stored and resumed, TPE is
reproducible, bad input writes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

import mergelab
from mergelab.errors import MergelabError
from mergelab.experiment import Store
from mergelab.search import search
from tests.experiment.tiny import TASKS, Zoos
from tests.search.tiny_search import SplitScorer, split_score

pytest.importorskip("optuna")

SCALINGS = [0.2, 0.4, 0.6, 0.8, 1.0]


def run_search(tmp_path: Path, scorer: SplitScorer | None = None, **kw: Any) -> Any:
    zoos = Zoos(tmp_path / "zoo")
    options: dict[str, Any] = {"space": {"scaling": "0.2:1.0:0.2"}, "db": tmp_path / "s.sqlite", "progress": False}
    options.update(kw)
    return search(options.pop("method", "task_arithmetic"), "tiny", build_zoo=zoos.build, suite_tasks=zoos.tasks,
                  evaluate=scorer or SplitScorer(), **options)


def mean_score(method: str, params: dict[str, Any], zoo: Any, split: str) -> float:
    merged = mergelab.merge(method, zoo.base, [zoo.experts[t] for t in TASKS], progress=False, **params)
    return sum(split_score(merged, zoo, t, split) for t in TASKS) / len(TASKS)


def test_grid_picks_the_best_validation_score_and_reports_test_apart(tmp_path: Path) -> None:
    scorer = SplitScorer()
    result = run_search(tmp_path, scorer, out=tmp_path / "best")
    zoo = Zoos(tmp_path / "check").build("tiny")
    by_hand = {s: mean_score("task_arithmetic", {"scaling": s}, zoo, "validation") for s in SCALINGS}
    assert [t.params["scaling"] for t in result.trials] == SCALINGS
    assert [t.score for t in result.trials] == pytest.approx([by_hand[s] for s in SCALINGS], abs=1e-6)
    best = max(SCALINGS, key=lambda s: by_hand[s])
    assert result.best.params == {"scaling": best} and result.best_params == {"scaling": best}
    assert scorer.calls == ["validation"] * 5 + ["test"]  # the test split is scored once, for the chosen one
    assert result.test["average"] == pytest.approx(mean_score("task_arithmetic", {"scaling": best}, zoo, "test"))
    assert result.test["normalized_average"] == pytest.approx(result.test["average"] / 0.8)
    assert result.merges == 1  # five scalings, one merge
    job = yaml.safe_load(result.job.read_text())
    assert job["method"] == "task_arithmetic" and job["parameters"] == {"scaling": best}
    assert [Path(m).name for m in job["models"]] == [f"{t}.safetensors" for t in TASKS]
    written = load_file(str(result.out / "model.safetensors")) if result.out.is_dir() else load_file(str(result.out))
    direct = mergelab.merge("task_arithmetic", job["base"], job["models"], progress=False, scaling=best)
    assert all(written[k].equal(direct[k]) for k in direct)
    with Store(tmp_path / "s.sqlite") as store:
        rows = store.rows()
    assert [r.kind for r in rows] == ["search"] * 5 + ["search_test"]
    assert rows[-1].metrics["split"] == "test" and rows[0].metrics["split"] == "validation"
    assert rows[0].config["params"] == {"scaling": 0.2} and rows[0].metrics["score"] == pytest.approx(by_hand[0.2])


def test_the_search_resumes_where_it_stopped(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        run_search(tmp_path, SplitScorer(fail_at=3, fail_with=KeyboardInterrupt()))
    with Store(tmp_path / "s.sqlite") as store:
        assert len(store.rows()) == 2  # trials 0 and 1 finished; the interrupted one left nothing
    rest = SplitScorer()
    resumed = run_search(tmp_path, rest)
    assert rest.calls == ["validation"] * 3 + ["test"] and resumed.ran == 3
    whole = run_search(tmp_path / "whole")
    assert [(t.params, t.score) for t in resumed.trials] == [(t.params, t.score) for t in whole.trials]
    again = SplitScorer()
    run_search(tmp_path, again)
    assert again.calls == []  # everything, the test score included, comes from the store


def test_tpe_is_seeded_and_resumes_to_the_same_trials(tmp_path: Path) -> None:
    space = {"scaling": "0.05:1.5:0.05", "density": [0.1, 0.3, 0.5]}
    kw = {"method": "ties", "space": space, "strategy": "tpe", "trials": 14, "seed": 3}
    first = run_search(tmp_path / "a", **kw)
    second = run_search(tmp_path / "b", **kw)
    assert [t.params for t in first.trials] == [t.params for t in second.trials]
    assert len({(t.params["scaling"], t.params["density"]) for t in first.trials}) > 5
    with pytest.raises(KeyboardInterrupt):
        run_search(tmp_path / "c", SplitScorer(fail_at=12, fail_with=KeyboardInterrupt()), **kw)
    resumed = run_search(tmp_path / "c", **kw)
    assert [t.params for t in resumed.trials] == [t.params for t in first.trials]
    assert [t.score for t in resumed.trials] == pytest.approx([t.score for t in first.trials])
    other = run_search(tmp_path / "d", **{**kw, "seed": 4})
    assert [t.params for t in other.trials] != [t.params for t in first.trials]


def test_more_trials_continue_the_same_search(tmp_path: Path) -> None:
    run_search(tmp_path, trials=2)
    scorer = SplitScorer()
    result = run_search(tmp_path, scorer)
    assert len(result.trials) == 5 and result.ran == 3 and scorer.calls.count("validation") == 3


def test_normalized_objective_divides_by_each_experts_validation_accuracy(tmp_path: Path) -> None:
    result = run_search(tmp_path, objective="normalized")
    zoo = Zoos(tmp_path / "check").build("tiny")
    merged = mergelab.merge("task_arithmetic", zoo.base, [zoo.experts[t] for t in TASKS], progress=False, scaling=0.2)
    expert = {t: split_score(load_file(str(zoo.experts[t])), zoo, t, "validation") for t in TASKS}
    assert all(v == pytest.approx(1.0) for v in expert.values())  # an expert is its own target
    expected = sum(split_score(merged, zoo, t, "validation") / expert[t] for t in TASKS) / 4
    assert result.trials[0].score == pytest.approx(expected)


def test_failed_trials_are_kept_and_retried_on_request(tmp_path: Path) -> None:
    result = run_search(tmp_path, SplitScorer(fail_at=2, fail_with=RuntimeError("boom")))
    assert result.trials[1].score is None and "boom" in result.errors[0]
    assert result.best is not None and result.best.number != 1
    retried = run_search(tmp_path, retry_failed=True)
    assert retried.ran == 1 and retried.trials[1].score is not None


@pytest.mark.parametrize("kw, message", [
    ({"space": {"scaling": "0.1:1.0"}}, "a grid needs"),
    ({"space": {"densty": [0.1]}, "method": "ties"}, "no hyperparameter"),
    ({"strategy": "random"}, "unknown strategy"),
    ({"objective": "max"}, "unknown objective"),
    ({"tasks": ["alpha", "omega"]}, "unknown task 'omega'"),
    ({"trials": 0}, "trials must be"),
    ({"method": "weight_average", "space": None}, "has no scaling"),
])
def test_bad_input_is_one_error_and_writes_nothing(tmp_path: Path, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(MergelabError, match=message) as info:
        run_search(tmp_path, **kw)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "s.sqlite").exists() and not (tmp_path / "zoo").exists()


def test_existing_out_is_refused_before_anything_runs(tmp_path: Path) -> None:
    (tmp_path / "best").mkdir()
    with pytest.raises(MergelabError, match="output exists"):
        run_search(tmp_path, out=tmp_path / "best")
    assert not (tmp_path / "s.sqlite").exists()


def test_report_shows_trials_and_the_test_score_apart(tmp_path: Path) -> None:
    from mergelab.report import write_report

    result = run_search(tmp_path, space={"scaling": [0.4, 1.0]})
    text = write_report(tmp_path / "s.sqlite", out=tmp_path / "r.md").read_text()
    assert "| 0 | scaling=0.4 | " + f"{result.trials[0].score:.4f} |" in text
    assert f"test accuracy {result.test['average']:.4f} (not used to choose)" in text
