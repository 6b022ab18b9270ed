"""Run an experiment: for every run of the config not yet in the store, merge, score, store one row.

The zoo and the evaluation are injected (``build_zoo`` and ``evaluate``, defaulting to
:func:`mergelab.zoo.build_zoo` and a cached :class:`mergelab.eval.Evaluator`), so the runner is tested
with real merges of tiny checkpoints and a tiny deterministic scorer. The interface they follow is
docs/api.md's "Experiments and reports":

* ``build_zoo(suite, *, backbone, quick, cache_dir, device, progress) -> Zoo`` (``base``,
  ``experts`` task -> model, ``expert_accuracy``);
* ``evaluate(model, zoo, *, tasks, device, batch_size, progress)`` -> an object with ``accuracy``
  (task -> accuracy).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab import threads
from mergelab.errors import MergelabError
from mergelab.experiment import metrics, provenance
from mergelab.experiment.config import ExperimentConfig, RunSpec, load_config, parse_config
from mergelab.experiment.store import Row, Store


@dataclass
class Summary:
    """What one invocation did: ``ran`` runs computed (``failed`` of them with an error), ``reused``
    finished runs found in the store, ``skipped_failed`` failed runs not retried."""

    db: Path
    total: int
    ran: int = 0
    reused: int = 0
    failed: int = 0
    skipped_failed: int = 0
    errors: list[str] = field(default_factory=list)


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


def run(config: str | Path | dict[str, Any] | ExperimentConfig, *, evaluate: Callable[..., Any] | None = None,
        build_zoo: Callable[..., Any] | None = None, suite_tasks: Callable[[str, bool], list[str]] | None = None,
        retry_failed: bool = False, progress: bool | None = None, db: str | Path | None = None,
        command: str | None = None, on_run: Callable[[Row], None] | None = None, ray: str | None = None) -> Summary:
    """Run every run of ``config`` that the results database does not hold yet.

    Args:
        config: a YAML path, a config mapping, or a parsed :class:`ExperimentConfig`. The whole config is
            validated (methods and hyperparameters through the registry, suites, task names) before
            anything runs.
        evaluate: scorer (default: :class:`CachedEvaluator`); see the module docstring.
        build_zoo: zoo provider (default: :func:`mergelab.zoo.build_zoo`).
        suite_tasks: ``(suite, quick) -> task names`` for validation (default: the suite definitions).
        retry_failed: run again the runs stored as failed (default: keep their error row).
        progress: progress bar over runs (default: when stderr is a terminal).
        db: results database (default: the config's ``db``, relative to the config file).
        command: the command line recorded with each row (default: this process's argv).
        on_run: called with each stored row (the CLI logs one line per run when there is no progress bar).
        ray: run each run as a Ray task on this cluster (``local``, ``local:N`` or an address; see
            :mod:`mergelab.distributed`); None (default): one after the other in this process.

    Returns:
        A :class:`Summary`. ``KeyboardInterrupt`` propagates; finished runs are already committed.
    """
    threads.ensure()  # local runs go one at a time (each the whole budget); Ray tasks get a share each
    if ray is not None:  # a bad address or a missing Ray fails before anything is written
        from mergelab.distributed import check_address, ray_module

        check_address(ray)
        ray_module()
    if isinstance(config, ExperimentConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = parse_config(config, suite_tasks=suite_tasks)
    else:
        cfg = load_config(config, suite_tasks=suite_tasks)
    if progress is None:
        import sys

        progress = sys.stderr.isatty()
    from mergelab.zoo import resolve_device

    device = resolve_device(cfg.device)
    score = evaluate or CachedEvaluator()
    if build_zoo is None:
        from mergelab.zoo import build_zoo as default_build

        build_zoo = default_build
    zoos: dict[str, Any] = {}
    common = {"versions": provenance.versions(), "hardware": provenance.hardware(device),
              "git_commit": provenance.git_commit(), "command": command or provenance.command_line()}

    with Store(db or cfg.db) as store:
        summary = Summary(Path(db or cfg.db), len(cfg.runs))
        todo = []
        for spec in cfg.runs:
            status = store.status(spec.hash)
            if status == "ok":
                summary.reused += 1
            elif status == "failed" and not retry_failed:
                summary.skipped_failed += 1
            else:
                todo.append(spec)
        from tqdm import tqdm

        def record(spec: RunSpec, row: Row) -> None:  # the driver alone writes the store
            store.put(row)
            if on_run is not None:
                on_run(row)
            summary.ran += 1
            if row.status != "ok":
                summary.failed += 1
                summary.errors.append(f"{row.label} [{spec.subset}]: {row.error}")

        def zoo_of(spec: RunSpec) -> Any:  # built (or loaded from its cache) only when a run needs it
            if spec.suite not in zoos:
                zoos[spec.suite] = build_zoo(spec.suite, backbone=spec.zoo["backbone"], quick=spec.zoo["quick"],
                                             cache_dir=cfg.cache_dir, device=device, progress=progress)
            return zoos[spec.suite]

        if ray is not None:  # each run a Ray task; rows come back as they finish
            from mergelab.experiment.remote import run_on_ray

            jobs = [(spec, zoo_of(spec)) for spec in todo]
            rows = run_on_ray(ray, jobs, evaluate, device, cfg.batch_size, common)
            for spec, row in tqdm(rows, total=len(todo), desc=cfg.name, unit="run", disable=not progress):
                record(spec, row)
            return summary
        for spec in tqdm(todo, desc=cfg.name, unit="run", disable=not progress):
            record(spec, _run_one(spec, zoo_of(spec), score, device, cfg.batch_size, progress, common))
    return summary


def _run_one(spec: RunSpec, zoo: Any, score: Callable[..., Any], device: str, batch_size: int, progress: bool,
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
    from mergelab.continual.rules.opcm import adaptive_lambda

    merger = ContinualMerger(spec.method, zoo.base, device=device, **spec.params)
    order = spec.tasks
    matrix: list[list[float | None]] = []
    step_seconds: list[float] = []
    lambdas: list[float] = []  # OPCM's Eq. (10) factor after each step (its Fig. 7)
    merge_s = eval_s = 0.0
    for j, task in enumerate(order):
        start = time.perf_counter()
        merger.add(zoo.experts[task], name=task, force=True)  # two tasks' experts may be identical files
        merged = merger.merged()
        step_seconds.append(round(time.perf_counter() - start, 3))
        merge_s += step_seconds[-1]
        if spec.method == "opcm":
            lambdas.append(adaptive_lambda(merger.scalars, j + 1))
        start = time.perf_counter()
        scored = score(merged, zoo, tasks=order[: j + 1], device=device, batch_size=batch_size, progress=progress)
        eval_s += time.perf_counter() - start
        matrix.append([float(scored.accuracy[t]) for t in order[: j + 1]] + [None] * (len(order) - j - 1))
    last = {t: a for t, a in zip(order, matrix[-1], strict=True) if a is not None}
    final = metrics.accuracy_metrics(last, order, _experts(zoo))
    result = {"order": order, "matrix": matrix, "acc": metrics.acc(matrix), "bwt": metrics.bwt(matrix),
              "step_average": metrics.step_averages(matrix), "step_seconds": step_seconds, **final}
    if lambdas:
        result["lambda_t"] = lambdas
    return result, merge_s, eval_s
