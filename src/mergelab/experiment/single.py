"""One run -> one row: merge (or adapt, or continue merging) the zoo's experts, score the result, compute the
metrics. The same code runs in the experiment's process and on a Ray worker (:mod:`.remote`)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any

from mergelab.errors import MergelabError
from mergelab.experiment import metrics
from mergelab.experiment.config import RunSpec
from mergelab.experiment.store import Row


class CachedEvaluator:
    """The default ``evaluate``: one :class:`mergelab.eval.Evaluator` per suite (base encoder, heads and
    test rows loaded once), scoring the requested subset of its tasks."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._evaluator: Any = None

    def __call__(self, model: Any, zoo: Any, *, tasks: list[str], device: str, batch_size: int,
                 progress: bool) -> Any:
        from mergelab.eval import Evaluator

        key = (zoo.suite, zoo.backbone, str(zoo.base), device, batch_size, progress)
        if key != self._key:  # one at a time: a suite's evaluator holds an encoder and all test rows
            self._evaluator = None
            self._evaluator = Evaluator(zoo, device=device, batch_size=batch_size, progress=progress)
            self._key = key
        evaluator = self._evaluator
        every = list(evaluator.tasks)
        try:  # score only the requested tasks: the evaluator iterates `tasks`, heads/test rows are kept
            evaluator.tasks = [t for t in every if t.name in tasks]
            return evaluator(model)
        finally:
            evaluator.tasks = every


def run_one(spec: RunSpec, zoo: Any, score: Callable[..., Any], device: str, batch_size: int, progress: bool,
             common: dict[str, Any]) -> Row:
    """One run -> one row; an exception (not an interrupt) becomes a failed row with its message."""
    merge_s = eval_s = 0.0
    result: dict[str, Any] | None = None
    error = None
    try:
        missing = [t for t in spec.tasks if t not in zoo.experts]
        if missing:
            raise MergelabError(f"zoo {zoo.suite!r} has no expert for task(s) {missing}")
        if spec.kind == "similarity":
            from mergelab.experiment.similarity import cosine_matrix

            start = time.perf_counter()
            result = {"tasks": spec.tasks, "cosine": cosine_matrix(zoo.base, [zoo.experts[t] for t in spec.tasks])}
            merge_s = time.perf_counter() - start
        elif spec.kind == "continual":
            result, merge_s, eval_s = _continual(spec, zoo, score, device, batch_size, progress)
        else:
            from mergelab.adapt.experiment import merged_for_run

            start = time.perf_counter()  # adamerging, adamerging_pp, cart_pp: adapted on the unlabelled inputs first
            merged, adapted = merged_for_run(spec.method, spec.params, zoo, spec.tasks, device, spec.adapt)
            merge_s = time.perf_counter() - start
            start = time.perf_counter()
            scored = score(merged, zoo, tasks=spec.eval_tasks, device=device, batch_size=batch_size,
                           progress=progress)
            eval_s = time.perf_counter() - start
            result = metrics.accuracy_metrics(dict(scored.accuracy), spec.eval_tasks, _experts(zoo))
            if adapted is not None:
                result["adapt"] = adapted
    except KeyboardInterrupt:
        raise
    except Exception as err:  # recorded, not raised: the other runs go on
        error = " ".join(f"{type(err).__name__}: {err}".split())
    return Row(hash=spec.hash, experiment=spec.experiment, kind=spec.kind, suite=spec.suite, method=spec.method,
               label=spec.label, config=spec.to_json(), status="ok" if error is None else "failed", metrics=result,
               error=error, merge_seconds=round(merge_s, 3), eval_seconds=round(eval_s, 3),
               created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **common)


def _experts(zoo: Any) -> dict[str, float]:
    """The zoo's expert accuracy per task (the reference of normalised accuracy), if it has them."""
    return getattr(zoo, "expert_accuracy", {}) or {}


def _continual(spec: RunSpec, zoo: Any, score: Callable[..., Any], device: str, batch_size: int,
               progress: bool) -> tuple[dict[str, Any], float, float]:
    """OPCM protocol: add the experts in ``spec.tasks`` order, score the tasks merged so far after each step."""
    from mergelab.continual import ContinualMerger

    merger = ContinualMerger(spec.method, zoo.base, device=device, **spec.params)
    order = spec.tasks
    matrix: list[list[float | None]] = []
    step_seconds: list[float] = []
    recorded: dict[str, list[float]] = {}  # what the rule reports after each step (OPCM: lambda_t)
    merge_s = eval_s = 0.0
    for j, task in enumerate(order):
        start = time.perf_counter()
        merger.add(zoo.experts[task], name=task, force=True)  # two tasks' experts may be identical files
        merged = merger.merged()
        step_seconds.append(round(time.perf_counter() - start, 3))
        merge_s += step_seconds[-1]
        if merger.rule.step_record is not None:
            for name, value in merger.rule.step_record(merger.scalars, j + 1).items():
                recorded.setdefault(name, []).append(value)
        start = time.perf_counter()
        scored = score(merged, zoo, tasks=order[: j + 1], device=device, batch_size=batch_size, progress=progress)
        eval_s += time.perf_counter() - start
        matrix.append([float(scored.accuracy[t]) for t in order[: j + 1]] + [None] * (len(order) - j - 1))
    last = {t: a for t, a in zip(order, matrix[-1], strict=True) if a is not None}
    final = metrics.accuracy_metrics(last, order, _experts(zoo))
    result = {"order": order, "matrix": matrix, "acc": metrics.acc(matrix), "bwt": metrics.bwt(matrix),
              "step_average": metrics.step_averages(matrix), "step_seconds": step_seconds, **final}
    result.update(recorded)
    if recorded:
        result["recorded"] = list(recorded)  # which metrics are per-step records (the report draws them)
    return result, merge_s, eval_s
