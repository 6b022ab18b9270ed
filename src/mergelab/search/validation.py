"""The validation split of a zoo task (docs/data.md §3) and a scorer for either split.

Validation rows are the training split's rows after the first ``n_train`` (the rows the experts trained on),
``n_val = n_test // 2`` of them (per class for class-incremental tasks; 500 when every test row is scored), cached beside the task's rows. The
scorer :class:`SplitEvaluator` is :class:`mergelab.eval.Evaluator` with the test rows swapped for
validation rows when asked for ``split="validation"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError
from mergelab.io.leftovers import write_text

SPLITS = ("validation", "test")


DEFAULT_ROWS = 500  # for tasks scored on their whole test split (n_test None: vader-domains)


def n_validation(spec: Any) -> int:
    """How many validation rows a task has (per class for per-class tasks): half its test rows, or
    :data:`DEFAULT_ROWS` when its whole test split is scored."""
    return DEFAULT_ROWS if spec.n_test is None else max(1, spec.n_test // 2)


def validation_path(spec: Any, cache_dir: str | Path | None = None) -> Path:
    from mergelab.zoo.datasets import task_path

    path = task_path(spec, cache_dir)
    return path.with_name(path.stem + "-validation.json")


def load_validation(spec: Any, cache_dir: str | Path | None = None) -> list[tuple[str, int]]:
    """The task's validation rows ``(text, class index of the scoring head)``, cached as JSON (atomically)."""
    path = validation_path(spec, cache_dir)
    if path.exists():
        return [(text, int(label)) for text, label in json.loads(path.read_text(encoding="utf-8"))]
    from mergelab.zoo.datasets import read_source
    from mergelab.zoo.splits import validation

    scored = list(spec.eval_classes or spec.classes)
    examples = read_source(spec)
    if spec.per_class:
        rows = validation(examples, spec.n_train, n_validation(spec), classes=spec.classes)
    else:
        wanted = set(spec.classes)
        rows = validation([e for e in examples if e[1] in wanted], spec.n_train, n_validation(spec))
    if not rows:
        raise MergelabError(f"task {spec.name!r} has no validation rows: every row of its training split is used "
                            f"for training (n_train={spec.n_train}; docs/data.md §3)", file=spec.source)
    index = {c: i for i, c in enumerate(scored)}
    out = [(text, index[label]) for text, label in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(out, ensure_ascii=False))
    return out


class SplitEvaluator:
    """The default scorer of a search: ``scorer(model, zoo, *, tasks, split, device, batch_size, progress)``.

    Keeps one :class:`mergelab.eval.Evaluator` per (zoo, split): encoder, heads and rows loaded once.
    """

    def __init__(self) -> None:
        self._evaluators: dict[tuple[Any, ...], Any] = {}

    def __call__(self, model: Any, zoo: Any, *, tasks: list[str], split: str, device: str, batch_size: int,
                 progress: bool) -> Any:
        from mergelab.eval import Evaluator

        if split not in SPLITS:
            raise MergelabError(f"unknown split {split!r} (validation or test)")
        key = (zoo.suite, zoo.backbone, str(zoo.base), tuple(tasks), split, device, batch_size)
        evaluator = self._evaluators.get(key)
        if evaluator is None:
            evaluator = Evaluator(zoo, tasks=tasks, device=device, batch_size=batch_size, progress=progress)
            if split == "validation":
                cache = zoo.path.parents[2] if getattr(zoo, "path", None) is not None else None
                evaluator.test = {t.name: load_validation(t, cache) for t in evaluator.tasks}
            self._evaluators[key] = evaluator
        every = list(evaluator.tasks)
        try:
            evaluator.tasks = [t for t in every if t.name in tasks]
            return evaluator(model)
        finally:
            evaluator.tasks = every
