"""``mergelab experiment CONFIG.yaml``: run a grid of merges and evaluations into an SQLite results database."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    from mergelab.cli._help import examples

    parser = sub.add_parser("experiment", help="run an experiment config (methods x hyperparameters x task "
                                               "subsets x suites); results in SQLite, resumable",
                            **examples("mergelab experiment experiments/smoke_quick.yaml --dry-run",
                                       "mergelab experiment experiments/smoke_quick.yaml",
                                       "mergelab experiment experiments/cart.yaml --retry-failed",
                                       "mergelab experiment experiments/smoke_quick.yaml --ray local"))
    parser.add_argument("config", help="experiment YAML (see experiments/ and README 'Experiments')")
    parser.add_argument("--db", help="results database (default: the config's `db`, relative to the config)")
    parser.add_argument("--retry-failed", action="store_true", help="run again the runs stored as failed")
    parser.add_argument("--dry-run", action="store_true", help="validate and list the runs; run nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--ray", metavar="local|ADDRESS", help="run each run as a Ray task (local, local:N CPUs, "
                                                               "or a cluster address); needs mergelab[distributed]")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mergelab.experiment import Store, load_config
    from mergelab.experiment import run as run_experiment

    config = load_config(args.config)
    if args.dry_run:
        db = args.db or config.db
        status = {}
        if Path(db).is_file():  # a dry run creates nothing
            with Store(db) as store:
                status = {r.hash: store.status(r.hash) for r in config.runs}
        for spec in config.runs:
            print(f"{spec.hash}  {status.get(spec.hash) or 'todo':6}  {spec.suite}  [{spec.subset}]  {spec.label}")
        print(f"{len(config.runs)} runs ({config.kind}); database {db}")
        return 0
    progress = False if args.quiet else sys.stderr.isatty()
    log = None if args.quiet or progress else _log_run  # no bar (e.g. nohup): one line per finished run
    summary = run_experiment(config, retry_failed=args.retry_failed, progress=progress, db=args.db, on_run=log,
                             ray=args.ray)
    print(f"{config.name}: {summary.total} runs: {summary.ran} run now ({summary.failed} failed), "
          f"{summary.reused} reused, {summary.skipped_failed} failed earlier and not retried (--retry-failed); "
          f"results in {summary.db}")
    for error in summary.errors:
        print(f"failed: {error}", file=sys.stderr)
    return 1 if summary.failed else 0


def _log_run(row: Any) -> None:
    average = (row.metrics or {}).get("average")
    outcome = f"average {average:.4f}" if average is not None else row.status if row.error is None else row.error
    print(f"{row.hash}  {row.label}: {outcome} (merge {row.merge_seconds:.1f} s, eval {row.eval_seconds:.1f} s)",
          file=sys.stderr, flush=True)
