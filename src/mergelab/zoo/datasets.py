"""A task's train/test rows, from its source through the split rule, cached as JSON under the zoo cache.

Rows are ``(text, class index)``; train indices point into ``spec.classes``, test indices into the scoring
head's classes (``spec.eval_classes`` for class-incremental suites, else ``spec.classes``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from mergelab.errors import MergelabError
from mergelab.io.leftovers import write_text
from mergelab.zoo.splits import first_per_class, split
from mergelab.zoo.suites import SOURCES, TaskSpec

FORMAT = 1  # bump when a recipe in sources.py / suites.py changes what a spec yields


@dataclass(frozen=True)
class TaskData:
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    sha256: str  # of the rows, recorded with each expert so that changed data rebuilds it


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("MERGELAB_CACHE", Path.home() / ".cache" / "mergelab"))


def spec_key(spec: TaskSpec) -> str:
    fields = dataclasses.asdict(spec)
    if spec.source.startswith("file:"):  # a user's file: its content is part of the recipe
        fields["file_sha256"] = _file_sha256(Path(spec.source[5:]))
    blob = json.dumps({"format": FORMAT, **fields}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def task_path(spec: TaskSpec, cache_dir: str | Path | None = None) -> Path:
    """Where the task's rows are cached (made from the source the first time the task is loaded)."""
    return cache_root(cache_dir) / "datasets" / f"{spec.name}-{spec_key(spec)}.json"


def load_task(spec: TaskSpec, cache_dir: str | Path | None = None) -> TaskData:
    """The task's rows, read from the cache or made from its source and cached (written atomically)."""
    path = task_path(spec, cache_dir)
    if path.exists():
        rows = json.loads(path.read_text(encoding="utf-8"))
    else:
        rows = _make_rows(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(rows, ensure_ascii=False))
    train = [(text, int(label)) for text, label in rows["train"]]
    test = [(text, int(label)) for text, label in rows["test"]]
    digest = hashlib.sha256(json.dumps([train, test], ensure_ascii=False).encode("utf-8")).hexdigest()
    return TaskData(train, test, digest)


def _make_rows(spec: TaskSpec) -> dict[str, list[tuple[str, int]]]:
    examples = read_source(spec)
    scored = spec.eval_classes or spec.classes
    if spec.per_class:
        train_all, test_all = split(examples, None, None)
        train = first_per_class(train_all, spec.classes, spec.n_train)
        test = first_per_class(test_all, spec.classes, spec.n_test)
    else:
        wanted = set(spec.classes)
        train, test = split([e for e in examples if e[1] in wanted], spec.n_train, spec.n_test)
    if not train or not test:
        raise MergelabError(f"task {spec.name!r}: no rows left for {'train' if not train else 'test'}", file=spec.source)
    train_index = {c: i for i, c in enumerate(spec.classes)}
    test_index = {c: i for i, c in enumerate(scored)}
    return {"train": [(t, train_index[c]) for t, c in train], "test": [(t, test_index[c]) for t, c in test]}


def read_source(spec: TaskSpec) -> list[tuple[str, str]]:
    if spec.source.startswith("file:"):
        from mergelab.zoo.user import read_rows

        return read_rows(spec)
    if spec.source not in SOURCES:
        raise MergelabError(f"task {spec.name!r}: unknown source {spec.source!r}")
    return SOURCES[spec.source]()


def _file_sha256(path: Path) -> str:
    if not path.is_file():
        raise MergelabError("no such data file", file=str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()
