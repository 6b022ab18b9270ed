"""An experiment's runs as Ray tasks (``mergelab experiment CONFIG --ray ...``).

The driver builds (or finds) each zoo, sends every worker the run, the zoo's paths and their sha256, and
stores each row as it comes back: a worker writes nothing. A run whose worker died more often than
:data:`mergelab.distributed.MAX_RETRIES` comes back as a failed row, filled in by ``--retry-failed``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

from mergelab.experiment.config import RunSpec
from mergelab.experiment.store import Row

_SCORER: Any = None  # per worker process: the default scorer keeps its encoder between runs


def remote_run(spec: RunSpec, zoo: Any, evaluate: Callable[..., Any] | None, device: str, batch_size: int,
               common: dict[str, Any], expected: dict[str, str]) -> Row:
    """One run on a worker: the models checked against the driver's fingerprints, then merged and scored."""
    global _SCORER
    from mergelab import threads
    from mergelab.distributed import check_fingerprints

    threads.in_task()  # this worker's share: the CPUs Ray gave the task
    from mergelab.experiment.single import CachedEvaluator, run_one

    check_fingerprints(expected)
    if evaluate is None:
        if _SCORER is None:
            _SCORER = CachedEvaluator()
        evaluate = _SCORER
    return run_one(spec, zoo, evaluate, device, batch_size, False, common)


def run_on_ray(address: str, jobs: list[tuple[RunSpec, Any]], evaluate: Callable[..., Any] | None, device: str,
               batch_size: int, common: dict[str, Any]) -> Iterator[tuple[RunSpec, Row]]:
    """Yield ``(spec, row)`` for every ``(spec, zoo)`` job as its Ray task finishes (an adapted run's
    options travel in its spec)."""
    from mergelab.distributed import connect, disconnect, fingerprints, run_tasks

    started = connect(address)
    try:
        prints: dict[int, dict[str, str]] = {}
        args = []
        for spec, zoo in jobs:
            if id(zoo) not in prints:
                prints[id(zoo)] = fingerprints([zoo.base, *zoo.experts.values()])
            expected = {p: d for p, d in prints[id(zoo)].items()
                        if p == str(zoo.base) or p in {str(zoo.experts[t]) for t in spec.tasks if t in zoo.experts}}
            args.append((spec, zoo, evaluate, device, batch_size, common, expected))
        for index, row, error in run_tasks(remote_run, args):
            spec = jobs[index][0]
            yield spec, row if error is None else lost_row(spec, error, common)
    finally:
        disconnect(started)


def lost_row(spec: RunSpec, error: BaseException, common: dict[str, Any]) -> Row:
    """The failed row of a run whose task was lost (its worker died on every try)."""
    message = " ".join(f"{type(error).__name__}: {error}".split())[:500]
    return Row(hash=spec.hash, experiment=spec.experiment, kind=spec.kind, suite=spec.suite, method=spec.method,
               label=spec.label, config=spec.to_json(), status="failed", metrics=None, error=message,
               merge_seconds=0.0, eval_seconds=0.0,
               created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **common)
