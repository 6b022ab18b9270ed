"""Users' own tasks and experts, from YAML, without code.

A task file (or an entry of a suite's ``tasks:`` list)::

    name: support_tickets          # task name
    file: tickets.csv              # CSV, TSV or JSONL of (text, label); relative to the YAML file
    text: text                     # column / key of the text (default "text")
    label: label                   # column / key of the label (default "label")
    labels: {bug: a software bug, billing: a billing question}   # raw label -> prompt name (or a list)
    n_train: 2000                  # rows per split after the hash split (default 2000 / 1000)
    n_test: 1000

A suite file: ``suite: NAME``, ``tasks:`` (task mappings, task YAML paths, or built-in MT8 task names),
optional ``sequential: true``, and optional ``experts: {task: model folder}`` to register your own
fine-tuned models as that task's expert (scored, never retrained).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError
from mergelab.zoo.suites import MT8, Suite, TaskSpec

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def is_yaml(name: str | Path) -> bool:
    return str(name).endswith((".yaml", ".yml"))


def load_suite_yaml(path: str | Path) -> tuple[Suite, dict[str, Path]]:
    """``(suite, registered experts)`` from a suite YAML (or a single-task YAML)."""
    path = Path(path)
    doc = _read_yaml(path)
    if "file" in doc:  # a single task
        doc = {"suite": doc.get("name", path.stem), "tasks": [doc]}
    if not isinstance(doc.get("tasks"), list) or not doc["tasks"]:
        raise MergelabError("a suite YAML needs a non-empty `tasks:` list", file=str(path))
    tasks = tuple(_task_entry(entry, path) for entry in doc["tasks"])
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise MergelabError(f"duplicate task names in {names}", file=str(path))
    experts = {str(k): (path.parent / str(v)).resolve() for k, v in (doc.get("experts") or {}).items()}
    unknown = set(experts) - set(names)
    if unknown:
        raise MergelabError(f"experts for unknown tasks: {sorted(unknown)}", file=str(path))
    suite = Suite(str(doc.get("suite", path.stem)), tasks, bool(doc.get("sequential", False)))
    return suite, experts


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise MergelabError("no such YAML file", file=str(path))
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise MergelabError(f"cannot read: {err.strerror}", file=str(path)) from None
    except UnicodeDecodeError as err:
        raise MergelabError(f"not UTF-8 text (byte {err.start})", file=str(path)) from None
    except yaml.YAMLError as err:
        raise MergelabError(f"not valid YAML ({str(err).splitlines()[0]})", file=str(path)) from None
    except RecursionError:
        raise MergelabError("not valid YAML (nested too deeply)", file=str(path)) from None
    if not isinstance(doc, dict):
        raise MergelabError("expected a YAML mapping", file=str(path))
    return doc


def _task_entry(entry: Any, suite_path: Path) -> TaskSpec:
    if isinstance(entry, str) and is_yaml(entry):
        task_path = suite_path.parent / entry
        return task_from_mapping(_read_yaml(task_path), task_path)
    if isinstance(entry, str):
        builtin = {t.name: t for t in MT8}
        if entry not in builtin:
            raise MergelabError(f"unknown built-in task {entry!r}; built-in: {', '.join(builtin)}", file=str(suite_path))
        return builtin[entry]
    if isinstance(entry, dict):
        return task_from_mapping(entry, suite_path)
    raise MergelabError("a task entry must be a mapping, a task YAML path or a built-in task name", file=str(suite_path))


def task_from_mapping(doc: dict[str, Any], where: Path) -> TaskSpec:
    """A :class:`TaskSpec` for a user's labelled file (paths relative to ``where``'s folder)."""
    for key in ("name", "file", "labels"):
        if key not in doc:
            raise MergelabError(f"task needs `{key}:`", file=str(where))
    data = (where.parent / str(doc["file"])).resolve()
    fmt = str(doc.get("format") or FORMATS.get(data.suffix.lower(), ""))
    if fmt not in ("csv", "tsv", "jsonl"):
        raise MergelabError("unknown data format (use format: csv, tsv or jsonl)", file=str(data))
    labels = doc["labels"]
    names = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {str(k): str(k) for k in labels}
    if len(names) < 2:
        raise MergelabError("a task needs at least two labels", file=str(where))
    options = (("format", fmt), ("text", str(doc.get("text", "text"))), ("label", str(doc.get("label", "label"))))
    return TaskSpec(str(doc["name"]), f"file:{data}", tuple(names), tuple(names.values()),
                    n_train=_count(doc, "n_train", 2000, where), n_test=_count(doc, "n_test", 1000, where),
                    options=options)


def _count(doc: dict[str, Any], key: str, default: int, where: Path) -> int:
    value = doc.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MergelabError(f"`{key}:` must be a positive integer", file=str(where))
    return value


def read_rows(spec: TaskSpec) -> list[tuple[str, str]]:
    """(text, raw label) rows of a user's file; rows whose label is not in ``spec.classes`` are an error."""
    from mergelab.zoo.sources import dedupe

    opts = dict(spec.options)
    path = Path(spec.source[len("file:"):])
    text_key, label_key = opts["text"], opts["label"]
    rows: list[tuple[str, str]] = []
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            text = handle.read()
    except OSError as err:
        raise MergelabError(f"cannot read: {err.strerror}", file=str(path)) from None
    except UnicodeDecodeError as err:
        raise MergelabError(f"not UTF-8 text (byte {err.start})", file=str(path)) from None
    if opts["format"] == "jsonl":
        records = []
        for number, line in enumerate(io.StringIO(text, newline=""), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    raise MergelabError(f"line {number} is not JSON", file=str(path)) from None
    else:
        try:
            records = list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if opts["format"] == "tsv" else ","))
        except csv.Error as err:
            raise MergelabError(f"not valid {opts['format'].upper()} ({err})", file=str(path)) from None
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or text_key not in record or label_key not in record:
            raise MergelabError(f"record {number} lacks `{text_key}` or `{label_key}`", file=str(path))
        label = str(record[label_key])
        if label not in spec.classes:
            raise MergelabError(f"record {number}: label {label!r} not among {list(spec.classes)}", file=str(path))
        rows.append((str(record[text_key]).strip(), label))
    return dedupe(rows)
