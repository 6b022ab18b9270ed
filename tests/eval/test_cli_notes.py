"""`mergelab eval` says, before its silent parts, that a suite is not built and that task data is being
made; a built suite with cached data says nothing of the kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergelab.cli.main import main
from tests.zoo.zoo_tiny import write_suite


def test_unbuilt_suite_and_first_time_data_are_announced(tmp_path: Path, tiny_bert: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    suite = str(write_suite(tmp_path / "data", ["t1", "t2"]))
    common = ["--suite", suite, "--backbone", str(tiny_bert), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(["eval", "base", *common, "--tasks", "t1"]) == 0
    err = capsys.readouterr().err
    assert "note: suite tiny is not built: scoring without normalised accuracies" in err
    assert f"`mergelab zoo build {suite} --backbone {tiny_bert} --cache-dir {tmp_path / 'cache'}` builds it" in err
    assert "preparing the task data of t1 from the packaged datasets" in err and "data of t2" not in err

    assert main(["zoo", "build", suite, "--backbone", str(tiny_bert), "--cache-dir", str(tmp_path / "cache"),
                 "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "base", *common]) == 0
    captured = capsys.readouterr()
    assert "not built" not in captured.err and "preparing" not in captured.err
    assert "t1" in captured.out and "t2" in captured.out
