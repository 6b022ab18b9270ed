"""Run an experiment: for every run of the config not yet in the store, merge, score, store one row (one run
itself: :mod:`mergelab.experiment.single`, the same code on a Ray worker).

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

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab import threads
from mergelab.experiment import provenance
from mergelab.experiment.config import ExperimentConfig, RunSpec, load_config, parse_config
from mergelab.experiment.single import CachedEvaluator, run_one
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
            record(spec, run_one(spec, zoo_of(spec), score, device, cfg.batch_size, progress, common))
    return summary
