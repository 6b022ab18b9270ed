"""A task's rows: class filter, per-class counts and head indices (class-incremental), JSON cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergelab.zoo import datasets
from mergelab.zoo.splits import split
from mergelab.zoo.suites import SOURCES, TaskSpec

ROWS = [(f"gloss {i}", "abcd"[i % 4]) for i in range(400)]


@pytest.fixture(autouse=True)
def synthetic_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SOURCES, "synthetic", lambda: list(ROWS))


def test_class_incremental_rows_index_the_joint_head(tmp_path: Path) -> None:
    spec = TaskSpec("task2", "synthetic", ("c", "a"), ("c", "a"), n_train=7, n_test=3, per_class=True,
                    eval_classes=("a", "b", "c", "d"), eval_names=("a", "b", "c", "d"))
    data = datasets.load_task(spec, tmp_path)
    train_all, test_all = split(ROWS, None, None)
    assert data.train == [(t, "ca".index(c)) for t, c in _first(train_all, "ca", 7)]  # own head: c=0, a=1
    assert data.test == [(t, "abcd".index(c)) for t, c in _first(test_all, "ca", 3)]  # joint 4-way head
    assert len(data.train) == 14 and len(data.test) == 6


def _first(rows: list[tuple[str, str]], classes: str, n: int) -> list[tuple[str, str]]:
    seen: dict[str, int] = {}
    out = []
    for text, label in rows:
        if label in classes and seen.get(label, 0) < n:
            seen[label] = seen.get(label, 0) + 1
            out.append((text, label))
    return out


def test_plain_task_filters_classes_then_splits(tmp_path: Path) -> None:
    spec = TaskSpec("t", "synthetic", ("b", "d"), ("bee", "dee"), n_train=10, n_test=4)
    data = datasets.load_task(spec, tmp_path)
    train, test = split([r for r in ROWS if r[1] in "bd"], 10, 4)
    assert data.train == [(t, "bd".index(c)) for t, c in train] and data.test == [(t, "bd".index(c)) for t, c in test]


def test_rows_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = TaskSpec("t", "synthetic", ("a", "b"), ("a", "b"), n_train=5, n_test=2)
    first = datasets.load_task(spec, tmp_path)
    monkeypatch.setitem(SOURCES, "synthetic", lambda: pytest.fail("source read again"))
    again = datasets.load_task(spec, tmp_path)
    assert again == first and len(list((tmp_path / "datasets").glob("t-*.json"))) == 1
    other = TaskSpec("t", "synthetic", ("a", "b"), ("a", "b"), n_train=6, n_test=2)
    assert datasets.spec_key(other) != datasets.spec_key(spec)  # another recipe, another cache file
