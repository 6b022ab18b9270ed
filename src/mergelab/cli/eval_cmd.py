"""``mergelab eval MODEL --suite NAME``: per-task accuracy with the suite's frozen heads, average, normalised."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mergelab.io.leftovers import write_text


def add_parser(sub: Any) -> None:
    from mergelab.cli._help import examples

    parser = sub.add_parser("eval", help="score a model on a zoo suite (per-task accuracy, average, normalised)",
                            **examples("mergelab eval base --suite mt8 --quick",
                                       "mergelab eval merged/ --suite mt8 --tasks sentiment,text_lang --json",
                                       "mergelab eval merged/ --suite my_suite.yaml --out result.json"))
    parser.add_argument("model", help="model folder, checkpoint file or backbone name; `base` scores the suite's "
                                      "pretrained base")
    parser.add_argument("--suite", required=True, help="built-in suite (mt8, ...) or a suite YAML file")
    parser.add_argument("--tasks", help="comma-separated subset of the suite's tasks")
    parser.add_argument("--quick", action="store_true", help="the suite's quick version")
    parser.add_argument("--backbone", default="all-minilm-l6-v2", help="the suite's backbone (heads come from it)")
    parser.add_argument("--cache-dir", help="cache root (default $MERGELAB_CACHE or ~/.cache/mergelab)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default 64)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mergelab.errors import MergelabError
    from mergelab.eval import evaluate

    if args.batch_size < 1:
        raise MergelabError("--batch-size must be at least 1")
    model = None if args.model == "base" and not Path(args.model).exists() else args.model
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    _say_what_happens(args, model, tasks)
    result = evaluate(model, args.suite, tasks=tasks, device=args.device, batch_size=args.batch_size,
                      progress=not args.no_progress, cache_dir=args.cache_dir, backbone=args.backbone,
                      quick=args.quick)
    payload = result.to_json() | {"model": args.model}
    if args.out:
        write_text(Path(args.out), json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2) if args.json else f"{args.model} on {result.suite}\n{result.table()}")
    return 0


def _say_what_happens(args: argparse.Namespace, model: str | None, tasks: list[str] | None) -> None:
    """On stderr, before the silent parts: a suite not built yet (no normalised scores) and task data
    made from the packaged datasets the first time (minutes for mt8). Bad input says nothing here: its
    error stays the only line."""
    from mergelab.io.names import resolve_model_name
    from mergelab.zoo import resolve_suite
    from mergelab.zoo.build import zoo_dir
    from mergelab.zoo.datasets import cache_root, task_path

    if model is not None:
        resolve_model_name(model)  # a path that does not exist: its error now, before any note
    spec, _ = resolve_suite(args.suite, args.quick)
    if set(tasks or []) - {t.name for t in spec.tasks}:
        return  # evaluate names the unknown tasks
    if not (zoo_dir(spec, args.backbone, args.cache_dir) / "zoo.json").exists():
        build = " ".join(["mergelab zoo build", args.suite] + (["--quick"] if args.quick else [])
                         + ([f"--backbone {args.backbone}"] if args.backbone != "all-minilm-l6-v2" else [])
                         + ([f"--cache-dir {args.cache_dir}"] if args.cache_dir else []))
        print(f"note: suite {spec.name} is not built: scoring without normalised accuracies (they need the "
              f"experts'); `{build}` builds it (mt8: ~15 min on 2 cores, --quick: ~1 min)", file=sys.stderr)
    missing = [t.name for t in spec.tasks if (tasks is None or t.name in tasks) and not task_path(t, args.cache_dir).exists()]
    if missing:
        print(f"preparing the task data of {', '.join(missing)} from the packaged datasets (first time only; "
              f"cached in {cache_root(args.cache_dir) / 'datasets'})", file=sys.stderr, flush=True)
