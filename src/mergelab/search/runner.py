"""``mergelab search``: tune a method's hyperparameters on the validation split of a zoo suite.

Every trial merges the experts of the chosen tasks in memory (:mod:`mergelab.search.candidates`), scores
the merge on each task's validation rows (docs/data.md §3) and is stored as one row of the experiment
store (kind ``search``) the moment it finishes; a rerun of the same search reuses its finished trials and
continues where it stopped. The best trial (highest validation score, the earliest on ties) is then scored
once on the test rows (a row of kind ``search_test``), written as a job YAML and, with ``out``, merged to
disk. The zoo and the scorer are injected like :func:`mergelab.experiment.run`'s (tests use tiny ones):
``evaluate(model, zoo, *, tasks, split, device, batch_size, progress)`` with ``split`` ``validation`` or
``test``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mergelab import threads
from mergelab.errors import MergelabError
from mergelab.experiment.config import canonical_json
from mergelab.experiment.metrics import accuracy_metrics
from mergelab.experiment.store import Row, Store
from mergelab.io.leftovers import write_text
from mergelab.search.space import check_space, default_space, grid, parse_space
from mergelab.search.strategy import STRATEGIES, propose
from mergelab.search.trials import (
    OBJECTIVES,
    SearchResult,
    SearchSpec,
    Trial,
    best_trial,
    now,
    objective_of,
    trial_of,
    trial_row,
)

_WORKER: dict[str, Any] = {}  # per process: candidate mergers (their shared merges) and the default scorer


def evaluate_trial(spec: SearchSpec, zoo: Any, number: int, params: dict[str, Any], *, evaluate: Any,
                   device: str, batch_size: int, fast: bool, reference: dict[str, float],
                   expected: dict[str, str] | None = None) -> dict[str, Any]:
    """Merge trial ``number``'s candidate in memory and score it on the validation rows; returns
    ``{metrics, score, error, merge_seconds, eval_seconds}`` (an exception becomes ``error``)."""
    from mergelab.search.candidates import CandidateMerger

    merge_s = eval_s = 0.0
    try:
        if expected:
            from mergelab.distributed import check_fingerprints

            check_fingerprints(expected)
        if evaluate is None:
            from mergelab.search.validation import SplitEvaluator

            evaluate = _WORKER.setdefault("scorer", SplitEvaluator())
        models = [zoo.experts[t] for t in spec.tasks]
        key = canonical_json([str(zoo.base), [str(m) for m in models], device, fast])
        merger = _WORKER.get("merger")
        if merger is None or _WORKER.get("merger_key") != key:
            merger = CandidateMerger(zoo.base, models, device=device, fast=fast)
            _WORKER.update(merger=merger, merger_key=key)
        start = time.perf_counter()
        merged = merger(spec.method, {**spec.params, **params})
        merge_s = time.perf_counter() - start
        start = time.perf_counter()
        scored = evaluate(merged, zoo, tasks=spec.tasks, split="validation", device=device, batch_size=batch_size,
                          progress=False)
        eval_s = time.perf_counter() - start
        metrics = {"split": "validation", **accuracy_metrics(dict(scored.accuracy), spec.tasks, reference)}
        return {"metrics": metrics, "score": objective_of(metrics, spec.objective), "error": None,
                "merge_seconds": merge_s, "eval_seconds": eval_s}
    except KeyboardInterrupt:
        raise
    except Exception as err:  # recorded as a failed trial: the search goes on
        return {"metrics": None, "score": None, "error": " ".join(f"{type(err).__name__}: {err}".split()),
                "merge_seconds": merge_s, "eval_seconds": eval_s}


def search(method: str, suite: str, *, space: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
           tasks: list[str] | None = None, strategy: str = "grid", trials: int | None = None, seed: int = 0,
           objective: str = "mean", batch: int = 1, db: str | Path = "search.sqlite", name: str | None = None,
           backbone: str = "all-minilm-l6-v2", quick: bool = False, cache_dir: str | Path | None = None,
           device: str = "cpu", batch_size: int = 64, job: str | Path | None = None, out: str | Path | None = None,
           overwrite: bool = False, ray: str | None = None, fast: bool = True, retry_failed: bool = False,
           progress: bool | None = None, build_zoo: Callable[..., Any] | None = None,
           evaluate: Callable[..., Any] | None = None,
           suite_tasks: Callable[[str, bool], list[str]] | None = None) -> SearchResult:
    """Tune ``method``'s hyperparameters on the validation split of ``suite``'s tasks.

    Args:
        method: a registered method.
        suite: a zoo suite (``mt8``, a suite YAML, ...); its experts are built or taken from the cache.
        space: ``{hyperparameter: dimension}`` (see :mod:`mergelab.search.space`); default: ``scaling`` over
            Weight Weaving's lambda range for the method.
        params: fixed hyperparameters of every candidate.
        tasks: the tasks whose experts are merged and scored (default: all of the suite's).
        strategy: ``grid`` (every point, or the first ``trials``) or ``tpe`` (optuna's TPE, seeded).
        trials: how many trials (grid: default all points; tpe: default 20). Trials already stored count.
        seed: TPE's seed.
        objective: ``mean`` (mean validation accuracy) or ``normalized`` (mean of accuracy / the expert's
            validation accuracy on its own task).
        batch: trials proposed at once (from the trials finished before them); with ``ray`` they run in
            parallel. The same ``seed`` and ``batch`` give the same trials locally and on Ray.
        db: the results store (SQLite); ``name``: the search's name there (default: ``method-suite``).
        job: where to write the best configuration as a job YAML (default: ``<db stem>-<name>-best.yaml``
            beside ``db``); ``out``: also merge it there (``overwrite`` to replace).
        ray: run trials as Ray tasks (``local``, ``local:N`` or an address); None: in this process.
        fast: recombine linear-in-scaling candidates from one merge (False: a full merge each, the reference).
        retry_failed: run again the trials stored as failed.
        build_zoo, evaluate, suite_tasks: injected zoo, scorer and task lookup (tests); see the module docstring.

    Raises:
        MergelabError: bad input (checked before any merge or zoo build).
    """
    from mergelab.methods.registry import get_method

    threads.ensure()  # local trials go one at a time (each the whole budget); Ray tasks get a share each
    get_method(method)
    if strategy not in STRATEGIES:
        raise MergelabError(f"unknown strategy {strategy!r} ({', '.join(STRATEGIES)})")
    if objective not in OBJECTIVES:
        raise MergelabError(f"unknown objective {objective!r} ({', '.join(OBJECTIVES)})")
    for label, value, low in (("trials", trials, 1), ("batch", batch, 1), ("seed", seed, 0)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise MergelabError(f"{label} must be an integer >= {low}, got {value!r}")
    if tasks is not None and not tasks:
        raise MergelabError("tasks: give at least one task")
    if ray is not None:
        from mergelab.distributed import check_address, ray_module

        check_address(ray)
        ray_module()  # installed?
    names = (suite_tasks or _suite_tasks)(suite, quick)
    unknown = [t for t in tasks or [] if t not in names]
    if unknown:
        raise MergelabError(f"unknown task {unknown[0]!r} for suite {suite!r}; tasks: {', '.join(names)}")
    chosen = list(tasks or names)
    fixed = dict(params or {})
    dims = parse_space(space) if space else default_space(method)
    check_space(method, fixed, dims, len(chosen))
    points = grid(dims) if strategy == "grid" else None
    total = trials if trials is not None else (len(points) if points is not None else 20)
    if points is not None:
        total = min(total, len(points))
        for point in points[:total]:  # every grid point resolves (cross-checks between hyperparameters)
            try:
                get_method(method).resolve({**fixed, **point}, len(chosen))
            except MergelabError as err:
                raise MergelabError(f"search point {point}: {err.message}") from None
    spec = SearchSpec(name or f"{method}-{Path(suite).stem}", method, suite, chosen, fixed, dims, strategy, seed,
                      objective, batch, {"backbone": backbone, "quick": quick})
    db = Path(db)
    job_path = Path(job) if job is not None else db.with_name(f"{db.stem}-{spec.name}-best.yaml")
    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.exists() and not overwrite:
        raise MergelabError("output exists; pass overwrite (--overwrite) to replace it", file=str(out_path))
    if progress is None:
        import sys

        progress = sys.stderr.isatty()
    from mergelab.zoo import resolve_device

    device = resolve_device(device)
    if build_zoo is None:
        from mergelab.zoo import build_zoo as default_build

        build_zoo = default_build
    from mergelab.distributed import connect, disconnect

    started = connect(ray) if ray is not None else False  # an unreachable cluster fails before anything is built
    try:
        zoo = build_zoo(suite, backbone=backbone, quick=quick, cache_dir=cache_dir, device=device, progress=progress)
        missing = [t for t in chosen if t not in zoo.experts]
        if missing:
            raise MergelabError(f"zoo {suite!r} has no expert for task(s) {missing}")
        if evaluate is None and ray is None:
            from mergelab.search.validation import SplitEvaluator

            evaluate = SplitEvaluator()
        _WORKER.clear()  # a fresh merger for this search (the driver's own process)
        with Store(db) as store:
            return _search(spec, store, zoo, total, evaluate=evaluate, device=device, batch_size=batch_size,
                           fast=fast, ray=ray, retry_failed=retry_failed, progress=progress, job=job_path,
                           out=out_path, overwrite=overwrite)
    finally:
        disconnect(started)


def _suite_tasks(suite: str, quick: bool) -> list[str]:
    from mergelab.experiment.config import SuiteTasks

    return SuiteTasks()(suite, quick)


def _search(spec: SearchSpec, store: Store, zoo: Any, total: int, *, evaluate: Any, device: str, batch_size: int,
            fast: bool, ray: str | None, retry_failed: bool, progress: bool, job: Path, out: Path | None,
            overwrite: bool) -> SearchResult:
    from tqdm import tqdm

    from mergelab.experiment import provenance

    common = {"versions": provenance.versions(), "hardware": provenance.hardware(device),
              "git_commit": provenance.git_commit(), "command": provenance.command_line()}
    stored = {r.hash: r for r in store.rows(experiment=spec.name) if r.kind.startswith("search")}
    reference = _expert_validation(spec, store, stored, zoo, evaluate, device, batch_size, common, ray)
    result = SearchResult(spec, store.path, [], None, None, None, None)
    history: list[tuple[dict[str, Any], float | None]] = []
    runner = _Runner(spec, zoo, evaluate, device, batch_size, fast, reference, ray)
    bar = tqdm(total=total, desc=f"search {spec.name}", unit="trial", disable=not progress)
    try:
        for start in range(0, total, spec.batch):
            numbers = range(start, min(start + spec.batch, total))
            batch: dict[int, Trial] = {}
            todo: list[tuple[int, dict[str, Any]]] = []
            for number in numbers:
                row = stored.get(spec.row_hash(f"trial:{number}"))
                if row is not None and (row.status == "ok" or not retry_failed):
                    batch[number] = trial_of(row)
                    bar.update(1)
                    continue
                todo.append((number, propose(spec.strategy, spec.space, number, spec.seed, history)))
            for number, params, outcome in runner.run(todo, result.trials):
                trial = Trial(number, params, outcome["score"], outcome["metrics"], outcome["error"])
                store.put(trial_row(spec, trial, outcome, common))
                batch[number] = trial
                bar.update(1)
            for number in numbers:  # told in trial order: the next batch's proposals see the same history
                trial = batch[number]
                result.trials.append(trial)
                history.append((trial.params, trial.score))
                if trial.error:
                    result.errors.append(f"trial {number} {trial.params}: {trial.error}")
            result.best = best_trial(result.trials)
            if result.best is not None:
                bar.set_postfix(best=f"{result.best.score:.4f}", refresh=False)
    finally:
        bar.close()
        runner.close()
    result.merges = runner.merges()
    if result.best is None:
        return result
    result.test = _test_score(spec, store, stored, zoo, result.best, evaluate, device, batch_size, common)
    result.job = write_job(job, spec.method, zoo, spec.tasks, result.best_params)
    if out is not None:
        from mergelab import api

        written = api.merge(spec.method, zoo.base, [zoo.experts[t] for t in spec.tasks], out=out,
                                 overwrite=overwrite, device=device, progress=progress, **result.best_params)
        assert isinstance(written, Path)
        result.out = written
    return result


class _Runner:
    """Evaluates a batch of trials, here (in order) or as Ray tasks (in parallel); a candidate equal to an
    earlier trial's is not recomputed."""

    def __init__(self, spec: SearchSpec, zoo: Any, evaluate: Any, device: str, batch_size: int, fast: bool,
                 reference: dict[str, float], ray: str | None):
        self.spec, self.zoo, self.evaluate, self.device = spec, zoo, evaluate, device
        self.kwargs = {"evaluate": evaluate, "device": device, "batch_size": batch_size, "fast": fast,
                       "reference": reference}
        self.ray = ray  # connected by search()
        self.expected: dict[str, str] = {}
        if ray is not None:
            from mergelab.distributed import fingerprints

            self.expected = fingerprints([zoo.base, *(zoo.experts[t] for t in spec.tasks)])

    def run(self, todo: list[tuple[int, dict[str, Any]]], earlier: list[Trial]) -> Any:
        seen = {canonical_json(t.params): t for t in earlier if t.score is not None}
        fresh = []
        for number, params in todo:
            same = seen.get(canonical_json(params))
            if same is not None:
                yield number, params, {"metrics": same.metrics, "score": same.score, "error": None,
                                       "merge_seconds": 0.0, "eval_seconds": 0.0, "same_as": same.number}
            else:
                fresh.append((number, params))
        if self.ray is None:
            for number, params in fresh:
                yield number, params, evaluate_trial(self.spec, self.zoo, number, params, **self.kwargs)
            return
        from mergelab.distributed import run_tasks

        jobs = [(self.spec, self.zoo, number, params, self.kwargs, self.expected) for number, params in fresh]
        for index, outcome, error in run_tasks(_remote_trial, jobs):
            number, params = fresh[index]
            if error is not None:
                outcome = {"metrics": None, "score": None, "error": " ".join(f"{type(error).__name__}: {error}".split())[:500],
                           "merge_seconds": 0.0, "eval_seconds": 0.0}
            yield number, params, outcome

    def merges(self) -> int:
        merger = _WORKER.get("merger")
        return int(merger.merges) if merger is not None else 0

    def close(self) -> None:
        """Nothing to release here: Ray is disconnected by :func:`search`."""


def _remote_trial(spec: SearchSpec, zoo: Any, number: int, params: dict[str, Any], kwargs: dict[str, Any],
                  expected: dict[str, str]) -> dict[str, Any]:
    threads.in_task()  # this worker's share: the CPUs Ray gave the task
    return evaluate_trial(spec, zoo, number, params, expected=expected, **kwargs)


def _expert_validation(spec: SearchSpec, store: Store, stored: dict[str, Row], zoo: Any, evaluate: Any, device: str,
                       batch_size: int, common: dict[str, Any], ray: str | None) -> dict[str, float]:
    """Each expert's validation accuracy on its own task (the ``normalized`` objective's reference), stored once."""
    if spec.objective != "normalized":
        return {}
    row_hash = spec.row_hash("experts")
    if row_hash in stored and stored[row_hash].metrics:
        return {t: float(a) for t, a in (stored[row_hash].metrics or {})["accuracy"].items()}
    if evaluate is None:  # the search runs on Ray: the driver scores the experts itself
        from mergelab.search.validation import SplitEvaluator

        evaluate = SplitEvaluator()
    start = time.perf_counter()
    accuracy = {t: float(evaluate(zoo.experts[t], zoo, tasks=[t], split="validation", device=device,
                                  batch_size=batch_size, progress=False).accuracy[t]) for t in spec.tasks}
    store.put(Row(hash=row_hash, experiment=spec.name, kind="search_experts", suite=spec.suite, method=spec.method,
                  label="experts on their own validation rows", config={"search": spec.key(), "search_hash": spec.hash},
                  status="ok", metrics={"split": "validation", "accuracy": accuracy}, error=None, merge_seconds=0.0,
                  eval_seconds=round(time.perf_counter() - start, 3), created=now(), **common))
    return accuracy


def _test_score(spec: SearchSpec, store: Store, stored: dict[str, Row], zoo: Any, best: Trial, evaluate: Any,
                device: str, batch_size: int, common: dict[str, Any]) -> dict[str, Any]:
    """The chosen candidate's accuracy on the test rows (normalised by the experts' test accuracy), stored once."""
    row_hash = spec.row_hash("test:" + canonical_json(best.params))
    if row_hash in stored and stored[row_hash].status == "ok" and stored[row_hash].metrics:
        return dict(stored[row_hash].metrics or {})
    if evaluate is None:
        from mergelab.search.validation import SplitEvaluator

        evaluate = SplitEvaluator()
    from mergelab.search.candidates import CandidateMerger

    start = time.perf_counter()
    merged = CandidateMerger(zoo.base, [zoo.experts[t] for t in spec.tasks], device=device, fast=False)(
        spec.method, {**spec.params, **best.params})
    merge_s = time.perf_counter() - start
    start = time.perf_counter()
    scored = evaluate(merged, zoo, tasks=spec.tasks, split="test", device=device, batch_size=batch_size,
                      progress=False)
    metrics = {"split": "test", "trial": best.number,
               **accuracy_metrics(dict(scored.accuracy), spec.tasks, getattr(zoo, "expert_accuracy", {}) or {})}
    shown = " ".join(f"{k}={v}" for k, v in best.params.items())
    store.put(Row(hash=row_hash, experiment=spec.name, kind="search_test", suite=spec.suite, method=spec.method,
                  label=f"best (trial {best.number}): {shown}",
                  config={"search": spec.key(), "search_hash": spec.hash, "trial": best.number, "params": best.params},
                  status="ok", metrics=metrics, error=None, merge_seconds=round(merge_s, 3),
                  eval_seconds=round(time.perf_counter() - start, 3), created=now(), **common))
    return metrics


def write_job(path: Path, method: str, zoo: Any, tasks: list[str], parameters: dict[str, Any]) -> Path:
    """The best configuration as a ``mergelab merge`` job YAML (absolute model paths), written atomically."""
    import yaml

    def where(model: Any) -> str:
        return str(Path(model).resolve()) if isinstance(model, (str, Path)) else repr(model)

    body = {"method": method, "base": where(zoo.base), "models": [where(zoo.experts[t]) for t in tasks],
            "parameters": parameters}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(body, sort_keys=False))
    return path
