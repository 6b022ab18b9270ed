"""`mergelab search` end to end on a tiny BERT zoo (real experts, real validation rows, the default scorer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergelab.cli.main import main

pytest.importorskip("transformers")
pytest.importorskip("optuna")

from tests.zoo.zoo_tiny import write_suite, write_tiny_bert  # noqa: E402


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "bert")


def test_search_cli_on_a_tiny_zoo(tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = write_suite(tmp_path / "data", ["t1", "t2"])
    argv = ["search", "--method", "task_arithmetic", "--suite", str(suite), "--backbone", str(tiny_bert),
            "--cache-dir", str(tmp_path / "cache"), "--space", "scaling=0.5:1.5:0.5", "--db", str(tmp_path / "s.sqlite"),
            "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "best"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["trials"] == 3 and printed["ran"] == 3 and printed["failed"] == 0
    assert printed["best"]["params"]["scaling"] in (0.5, 1.0, 1.5)
    assert printed["test"]["split"] == "test" and set(printed["test"]["accuracy"]) == {"t1", "t2"}
    assert Path(printed["out"], "model.safetensors").is_file() and Path(printed["job"]).is_file()
    from mergelab.search.validation import load_validation, validation_path
    from mergelab.zoo import resolve_suite
    from mergelab.zoo.datasets import load_task

    spec = resolve_suite(str(suite))[0].tasks[0]
    assert validation_path(spec, tmp_path / "cache").is_file()  # the validation rows were cached
    val, data = load_validation(spec, tmp_path / "cache"), load_task(spec, tmp_path / "cache")
    assert len(val) == 8 and not {t for t, _ in val} & ({t for t, _ in data.train} | {t for t, _ in data.test})
    assert main([*argv, "--out", str(tmp_path / "best")]) == 2  # --out exists: refused
    assert "output exists" in capsys.readouterr().err
    assert main([*argv, "--job", str(tmp_path / "again.yaml")]) == 0  # resumed: nothing re-run
    assert "3 trials (0 run now, 0 failed)" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--space", "scaling"], "expected NAME=VALUE"),
    (["--space", "scaling=1:0"], "low <= high"),
    (["--set", "densty=0.2", "--method", "ties"], "no hyperparameter"),
    (["--method", "nope"], "unknown method"),
    (["--tasks", "t1,t9"], "unknown task 't9'"),
    (["--ray", "local:x"], "local:N"),
])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                                         message: str) -> None:
    suite = write_suite(tmp_path / "data", ["t1"])
    argv = ["search", "--method", "task_arithmetic", "--suite", str(suite), "--db", str(tmp_path / "s.sqlite"),
            "--cache-dir", str(tmp_path / "cache"), "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mergelab: error:") and "\n" not in err and message in err
    assert not (tmp_path / "s.sqlite").exists() and not (tmp_path / "cache" / "zoo").exists()
