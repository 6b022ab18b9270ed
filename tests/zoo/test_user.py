"""Users' own tasks in YAML: CSV, TSV and JSONL files, label names, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergelab.errors import MergelabError
from mergelab.zoo import resolve_suite
from mergelab.zoo.datasets import load_task
from mergelab.zoo.user import load_suite_yaml, read_rows


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_formats_give_the_same_rows(tmp_path: Path, fmt: str) -> None:
    rows = [("a, quoted text", "x"), ("plain", "y"), ("plain", "y")]  # duplicate kept once
    if fmt == "jsonl":
        body = "\n".join(json.dumps({"sentence": t, "tag": c}) for t, c in rows) + "\n"
    else:
        sep = "\t" if fmt == "tsv" else ","
        quote = (lambda t: f'"{t}"') if fmt == "csv" else (lambda t: t)
        body = f"sentence{sep}tag\n" + "".join(f"{quote(t)}{sep}{c}\n" for t, c in rows)
    write(tmp_path / f"d.{fmt}", body)
    task = write(tmp_path / "t.yaml", f"name: t\nfile: d.{fmt}\ntext: sentence\nlabel: tag\nlabels: [x, y]\n")
    suite, experts = load_suite_yaml(task)
    assert suite.name == "t" and experts == {} and suite.tasks[0].names == ("x", "y")
    assert read_rows(suite.tasks[0]) == [("a, quoted text", "x"), ("plain", "y")]


def test_label_names_and_split_rows(tmp_path: Path) -> None:
    write(tmp_path / "d.csv", "text,label\n" + "".join(f"row {i},{'p' if i % 2 else 'n'}\n" for i in range(40)))
    task = write(tmp_path / "t.yaml", "name: t\nfile: d.csv\nlabels: {p: positive, n: negative}\nn_train: 5\nn_test: 3\n")
    suite, _ = resolve_suite(task)
    data = load_task(suite.tasks[0], tmp_path / "cache")
    assert suite.tasks[0].names == ("positive", "negative")
    assert len(data.train) == 5 and len(data.test) == 3 and {c for _, c in data.train} <= {0, 1}


def test_suite_mixes_builtin_and_user_tasks(tmp_path: Path) -> None:
    write(tmp_path / "d.csv", "text,label\na,p\nb,n\n")
    write(tmp_path / "mine.yaml", "name: mine\nfile: d.csv\nlabels: [p, n]\n")
    suite_file = write(tmp_path / "s.yaml", "suite: mix\ntasks: [sentiment, mine.yaml]\nexperts: {mine: model}\n")
    suite, experts = load_suite_yaml(suite_file)
    assert [t.name for t in suite.tasks] == ["sentiment", "mine"] and experts == {"mine": (tmp_path / "model")}


@pytest.mark.parametrize(("body", "message"), [
    ("name: t\nfile: d.csv\n", "task needs `labels:`"),
    ("name: t\nfile: d.xls\nlabels: [p, n]\n", "unknown data format"),
    ("name: t\nfile: d.csv\nlabels: [p]\n", "at least two labels"),
    ("name: t\nfile: d.csv\nlabels: [p, n]\nn_train: -1\n", "positive integer"),
    ("suite: s\ntasks: [nope]\n", "unknown built-in task 'nope'"),
    ("suite: s\ntasks: []\n", "non-empty `tasks:`"),
    ("[1, 2]\n", "expected a YAML mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_yaml_is_a_one_line_error(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(MergelabError, match=message.replace("[", r"\[")) as err:
        load_suite_yaml(write(tmp_path / "t.yaml", body))
    assert "\n" not in str(err.value)


def test_unknown_label_in_file(tmp_path: Path) -> None:
    write(tmp_path / "d.csv", "text,label\na,p\nb,q\n")
    suite, _ = load_suite_yaml(write(tmp_path / "t.yaml", "name: t\nfile: d.csv\nlabels: [p, n]\n"))
    with pytest.raises(MergelabError, match="record 2: label 'q' not among"):
        read_rows(suite.tasks[0])
