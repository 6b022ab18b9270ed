"""``mergelab eval MODEL --suite NAME``: per-task accuracy with the suite's frozen heads, average, normalised."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("eval", help="score a model on a zoo suite (per-task accuracy, average, normalised)")
    parser.add_argument("model", help="model folder or checkpoint file; `base` scores the suite's pretrained base")
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
    result = evaluate(model, args.suite, tasks=tasks, device=args.device, batch_size=args.batch_size,
                      progress=not args.no_progress, cache_dir=args.cache_dir, backbone=args.backbone,
                      quick=args.quick)
    payload = result.to_json() | {"model": args.model}
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        tmp.replace(out)
    print(json.dumps(payload, indent=2) if args.json else f"{args.model} on {result.suite}\n{result.table()}")
    return 0
