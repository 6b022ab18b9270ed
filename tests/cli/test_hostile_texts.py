"""Text inputs a user writes by hand -- merge, experiment and zoo YAML files, a zoo task's data file --
that are not UTF-8 or not parseable: exit 2 with one line naming the file, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergelab.cli.main import main

NOT_UTF8 = b"method: ties\nbase: caf\xe9\n"  # Latin-1, as an editor on another system may save it
DEEP = b"method: " + b"[" * 5000 + b"]" * 5000 + b"\n"  # PyYAML's composer recurses once per level


def _suite_with_task_data(folder: Path, data: bytes) -> Path:
    (folder / "d.csv").write_bytes(data)
    (folder / "t.yaml").write_text("name: t\nfile: d.csv\nlabels: [p, n]\n")
    (folder / "s.yaml").write_text("suite: s\ntasks: [t.yaml]\n")
    return folder / "s.yaml"


CASES = {  # name: (file to write, its bytes, argv given the file, the file the error names, message)
    "merge YAML not UTF-8": ("job.yaml", NOT_UTF8, lambda p: ["merge", str(p), "--out", str(p.parent / "o")],
                             "not UTF-8 text (byte 22)"),
    "merge YAML nested too deeply": ("job.yaml", DEEP, lambda p: ["plan", str(p)], "nested too deeply"),
    "experiment YAML not UTF-8": ("exp.yaml", NOT_UTF8, lambda p: ["experiment", str(p)], "not UTF-8 text"),
    "experiment YAML nested too deeply": ("exp.yaml", DEEP, lambda p: ["experiment", str(p)], "nested too deeply"),
    "suite YAML not UTF-8": ("s.yaml", b"suite: s\ntasks: [caf\xe9]\n",
                             lambda p: ["eval", "base", "--suite", str(p)], "not UTF-8 text (byte 20)"),
    "suite YAML nested too deeply": ("s.yaml", DEEP, lambda p: ["eval", "base", "--suite", str(p)], "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hand_written_yaml_that_cannot_be_read_exits_2(tmp_path, capsys, case):
    name, data, argv, message = CASES[case]
    path = tmp_path / name
    path.write_bytes(data)
    assert main(argv(path)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mergelab: error: {path}: ") and err.count("\n") == 1, err
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing written


@pytest.mark.parametrize(("data", "message"), [(b"text,label\ncaf\xe9,p\n", "not UTF-8 text (byte 14)"),
                                               (b"text,label\n" + b"x" * 200_000 + b",p\n", "not valid CSV (field larger than field limit")])
def test_zoo_task_data_that_cannot_be_read_exits_2(tmp_path, capsys, data, message):
    suite = _suite_with_task_data(tmp_path, data)
    argv = ["zoo", "build", str(suite), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mergelab: error: {tmp_path / 'd.csv'}: ") and err.count("\n") == 1, err
    assert message in err
