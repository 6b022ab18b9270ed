"""``mergelab search``: tune a method's hyperparameters on a zoo suite's validation split."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mergelab.errors import MergelabError


def add_parser(sub: Any) -> None:
    from mergelab.cli._help import examples

    parser = sub.add_parser(
        "search", help="tune a method's hyperparameters on the validation split of a zoo suite (grid or TPE); "
                       "trials in SQLite, resumable",
        **examples("mergelab search --method task_arithmetic --suite mt8 --space scaling=0.1:1.0:0.1",
                   "mergelab search --method ties --suite mt8 --strategy tpe --trials 30 --seed 0 "
                   "--space scaling=0.1:1.5:0.1 --space density=0.1,0.2,0.3 --out merged/",
                   "mergelab search --method weave --set inner=ties --space 'lambdas=[0.5,1.0],[0.1,0.5,1.0]' "
                   "--suite mt8-quick",
                   "mergelab search --method tsv --suite mt8 --ray local --batch 4"))
    parser.add_argument("--method", required=True, help="merging method (see 'mergelab methods')")
    parser.add_argument("--suite", required=True, help="zoo suite: mt8, NAME-quick, or a suite YAML")
    parser.add_argument("--tasks", help="comma-separated tasks to merge and score (default: all of the suite's)")
    parser.add_argument("--space", action="append", default=[], metavar="NAME=SPEC",
                        help="a searched hyperparameter: LOW:HIGH:STEP, LOW:HIGH (tpe), LOW:HIGH:log (tpe) or "
                             "A,B,C (repeat; default: scaling over Weight Weaving's range for the method)")
    parser.add_argument("--set", action="append", default=[], dest="params", metavar="NAME=VALUE",
                        help="a fixed hyperparameter of every candidate (repeat)")
    parser.add_argument("--strategy", default="grid", choices=("grid", "tpe"), help="grid (default) or tpe (optuna)")
    parser.add_argument("--trials", type=int, help="number of trials (grid: all points; tpe: 20)")
    parser.add_argument("--seed", type=int, default=0, help="TPE's seed (default 0)")
    parser.add_argument("--objective", default="mean", choices=("mean", "normalized"),
                        help="validation accuracy averaged over tasks (mean) or normalised by each expert's")
    parser.add_argument("--batch", type=int, help="trials proposed and run at once (default 1; 4 with --ray)")
    parser.add_argument("--db", default="search.sqlite", help="results database (default search.sqlite)")
    parser.add_argument("--name", help="the search's name in the database (default METHOD-SUITE)")
    parser.add_argument("--job", help="where the best configuration's job YAML goes (default beside --db)")
    parser.add_argument("--out", help="also merge the best configuration into this folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--ray", metavar="local|ADDRESS", help="run trials as Ray tasks (local, local:N CPUs, or "
                                                               "a cluster address); needs mergelab[distributed]")
    parser.add_argument("--backbone", default="all-minilm-l6-v2", help="zoo backbone (default all-minilm-l6-v2)")
    parser.add_argument("--quick", action="store_true", help="the suite's quick version")
    parser.add_argument("--cache-dir", help="zoo cache (default $MERGELAB_CACHE or ~/.cache/mergelab)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="merge and score here")
    parser.add_argument("--retry-failed", action="store_true", help="run again the trials stored as failed")
    parser.add_argument("--no-fast", action="store_true", help="a full merge per candidate (no linear recombination)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def parse_assignments(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise MergelabError(f"{flag} {item!r}: expected NAME=VALUE")
        out[name.strip()] = value
    return out


def _value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise MergelabError(f"--set: cannot read the value {text!r}") from None


def _space(text: str) -> Any:
    """A --space value: a YAML list of choices whose items are lists (``[0.5,1.0],[0.1]``), else the string."""
    if text.lstrip().startswith("["):
        import yaml

        try:
            return list(yaml.safe_load(f"[{text}]"))
        except yaml.YAMLError:
            raise MergelabError(f"--space: cannot read {text!r}") from None
    return text


def run(args: argparse.Namespace) -> int:
    from mergelab.search import search

    params = {k: _value(v) for k, v in parse_assignments(args.params, "--set").items()}
    space = {k: _space(v) for k, v in parse_assignments(args.space, "--space").items()}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    batch = args.batch if args.batch is not None else (4 if args.ray else 1)
    progress = False if args.quiet else sys.stderr.isatty()
    result = search(args.method, args.suite, space=space or None, params=params, tasks=tasks, strategy=args.strategy,
                    trials=args.trials, seed=args.seed, objective=args.objective, batch=batch, db=args.db,
                    name=args.name, backbone=args.backbone, quick=args.quick, cache_dir=args.cache_dir,
                    device=args.device, job=args.job, out=args.out, overwrite=args.overwrite, ray=args.ray,
                    fast=not args.no_fast, retry_failed=args.retry_failed, progress=progress)
    summary = {"name": result.spec.name, "db": str(result.db), "trials": len(result.trials), "ran": result.ran,
               "failed": sum(t.score is None for t in result.trials),
               "best": None if result.best is None else {"trial": result.best.number, "params": result.best_params,
                                                         "validation": result.best.score},
               "test": result.test, "job": str(result.job) if result.job else None,
               "out": str(result.out) if result.out else None}
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
    else:
        print(f"{result.spec.name}: {len(result.trials)} trials ({result.ran} run now, "
              f"{summary['failed']} failed); results in {result.db}")
        if result.best is not None and result.test is not None:
            shown = " ".join(f"{k}={v}" for k, v in result.best.params.items())
            test = result.test
            norm = f", normalised {test['normalized_average']:.4f}" if "normalized_average" in test else ""
            print(f"best: trial {result.best.number} {shown}: validation {args.objective} {result.best.score:.4f}")
            print(f"test accuracy of the chosen candidate: {test['average']:.4f}{norm} (reported apart: not used "
                  f"to choose)")
            print(f"job: {result.job}" + (f"; merged model: {result.out}" if result.out else ""))
    for error in result.errors:
        print(f"failed: {error}", file=sys.stderr)
    return 0 if result.best is not None else 1
