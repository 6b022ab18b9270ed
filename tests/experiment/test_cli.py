"""``mergelab experiment`` / ``mergelab report`` end to end: exit 0 on success, 1 when runs failed, 2 with a
one-line error naming the config file and key on a bad config (nothing written), resume on rerun."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mergelab.cli.main import main
from mergelab.experiment import Store
from tests.experiment.tiny import Scorer, Zoos

CONFIG = "name: cli\ndb: results/cli.sqlite\nsuites: [tiny]\ntasks: [all, {size: 3}]\nmethods: [task_arithmetic, ties]\n"


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The CLI's default zoo, suite lookup and scorer replaced by the tiny ones (same call signatures)."""
    zoos, scorer = Zoos(tmp_path / "zoo"), Scorer()
    monkeypatch.setattr("mergelab.zoo.build_zoo", zoos.build)
    monkeypatch.setattr("mergelab.experiment.config.SuiteTasks.__call__", lambda self, s, q: zoos.tasks(s, q))
    monkeypatch.setattr("mergelab.experiment.runner.CachedEvaluator", lambda: scorer)
    return {"zoos": zoos, "scorer": scorer}


def write(tmp_path: Path, text: str = CONFIG) -> Path:
    path = tmp_path / "cli.yaml"
    path.write_text(text)
    return path


def test_run_then_rerun_reuses_then_report(tmp_path: Path, fakes: dict[str, Any],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path)
    assert main(["experiment", str(config), "--quiet"]) == 0
    assert "10 runs: 10 run now (0 failed), 0 reused" in capsys.readouterr().out
    assert main(["experiment", str(config), "--quiet"]) == 0
    assert "0 run now (0 failed), 10 reused" in capsys.readouterr().out
    assert fakes["scorer"].calls == 10
    db = tmp_path / "results" / "cli.sqlite"
    assert main(["report", str(db), "--out", str(tmp_path / "rep" / "report.md")]) == 0
    assert "## cli (multitask)" in (tmp_path / "rep" / "report.md").read_text()


def test_without_a_terminal_one_line_per_run_is_logged(tmp_path: Path, fakes: dict[str, Any],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", str(write(tmp_path))]) == 0  # pytest's stderr is not a terminal
    lines = [line for line in capsys.readouterr().err.splitlines() if "(merge " in line]
    assert len(lines) == 10 and all(": average 0." in line or ": average 1." in line for line in lines)
    assert any(" ties: average" in line for line in lines)


def test_failed_runs_exit_1_and_are_retried_on_request(tmp_path: Path, fakes: dict[str, Any],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    fakes["scorer"].fail_at, fakes["scorer"].fail_with = 2, RuntimeError("broken scorer")
    config = write(tmp_path)
    assert main(["experiment", str(config), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "(1 failed)" in captured.out and "RuntimeError: broken scorer" in captured.err
    assert main(["experiment", str(config), "--quiet"]) == 0  # failed run kept, not retried
    assert main(["experiment", str(config), "--quiet", "--retry-failed"]) == 0
    with Store(tmp_path / "results" / "cli.sqlite") as store:
        assert [r.status for r in store.rows()] == ["ok"] * 10


def test_dry_run_lists_runs_and_writes_nothing(tmp_path: Path, fakes: dict[str, Any],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", str(write(tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("todo") == 10 and "10 runs (multitask)" in out
    assert not (tmp_path / "results").exists() and fakes["scorer"].calls == 0


@pytest.mark.parametrize(("text", "message"), [
    (CONFIG.replace("ties", "tiez"), "cli.yaml: methods[1]: unknown method 'tiez'"),
    (CONFIG.replace("[all, {size: 3}]", "[[alpha, omega]]"), "cli.yaml: tasks[0]: unknown task 'omega'"),
    (CONFIG + "methods_typo: 1\n", "cli.yaml: methods_typo: unknown key"),
    ("suites: [tiny\n", "cli.yaml: not valid YAML"),
])
def test_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, fakes: dict[str, Any],
                                                             capsys: pytest.CaptureFixture[str], text: str,
                                                             message: str) -> None:
    assert main(["experiment", str(write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "results").exists() and fakes["scorer"].calls == 0


def test_report_of_missing_database_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "r.md")]) == 2
    assert "none.sqlite: no such results database" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()
