"""``mergelab adapt --method cart_pp --suite mt8 --out DIR``: learn a merge's coefficients on unlabelled inputs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    from mergelab.cli._help import examples

    parser = sub.add_parser(
        "adapt", help="test-time adaptation: learn merging coefficients on unlabelled inputs (AdaMerging, CART++)",
        **examples("mergelab adapt --method cart_pp --suite mt8 --out merged/",
                   "mergelab adapt --method adamerging --suite mt8 --quick --set granularity=task --steps 100 --out m/",
                   "mergelab adapt --method adamerging_pp --suite mt8 --unlabelled train --out m/",
                   "mergelab merge --method cart_pp --base all-minilm-l6-v2 --model E1 ... "
                   "--set coefficients=merged/adapt_coefficients.json --out again/"))
    parser.add_argument("--method", required=True, help="adamerging, adamerging_pp or cart_pp")
    parser.add_argument("--suite", required=True, help="built-in suite (mt8, ...) or a suite YAML file; its experts "
                                                        "are built or reused from the cache")
    parser.add_argument("--quick", action="store_true", help="the suite's quick version")
    parser.add_argument("--tasks", help="comma-separated subset of the suite's tasks")
    parser.add_argument("--out", required=True, help="output folder (model + adapt_coefficients.json + adapt_trace.json)")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                        help="method hyperparameter, e.g. --set granularity=task, --set rank_ratio=0.08 (repeat)")
    parser.add_argument("--unlabelled", default="test",
                        help="test (default: the papers' protocol), train, or a JSON file {task: [texts] or path}")
    parser.add_argument("--steps", type=int, default=500, help="optimiser steps (default 500, official)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3, official)")
    parser.add_argument("--batch-size", type=int, default=16, help="inputs per batch (default 16, official)")
    parser.add_argument("--batches", type=int, default=1,
                        help="batches per task per step (default 1, as FusionBench; 2 is the official code's, twice the time)")
    parser.add_argument("--no-clamp", action="store_true", help="do not clamp coefficients to [0, 1] (FusionBench)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="accuracy in the trace every N steps (0: before and after; -1: never)")
    parser.add_argument("--deltas-dtype", default="float32", help="float32 or bfloat16 (half the memory)")
    parser.add_argument("--backbone", default="all-minilm-l6-v2", help="the suite's backbone")
    parser.add_argument("--cache-dir", help="cache root (default $MERGELAB_CACHE or ~/.cache/mergelab)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (atomically)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the coefficients and final accuracy as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import mergelab
    from mergelab.cli.merge_cmd import parse_sets
    from mergelab.errors import MergelabError

    unlabelled: Any = args.unlabelled
    if unlabelled not in ("test", "train"):
        try:
            with open(unlabelled, encoding="utf-8") as handle:
                unlabelled = json.load(handle)
        except (OSError, ValueError) as err:
            raise MergelabError(f"--unlabelled: not test, train or a readable JSON file ({err})",
                                file=args.unlabelled) from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    result = mergelab.adapt(args.method, args.suite, quick=args.quick, tasks=tasks, out=args.out,
                            overwrite=args.overwrite, unlabelled=unlabelled, steps=args.steps, lr=args.lr,
                            batch_size=args.batch_size, batches=args.batches, clamp=not args.no_clamp, seed=args.seed,
                            eval_every=args.eval_every, deltas_dtype=args.deltas_dtype, backbone=args.backbone,
                            cache_dir=args.cache_dir, device=args.device, progress=not args.quiet and sys.stderr.isatty(),
                            **parse_sets(args.sets))
    accs = result.accuracies
    if args.json:
        print(json.dumps({"out": str(result.out), "coefficients": result.coefficients,
                          "accuracy": accs[-1] if accs else None, "entropy": result.entropies[-1:]}, indent=2))
    else:
        first, last = (result.entropies[0], result.entropies[-1]) if result.entropies else (None, None)
        print(f"{result.method}: {len(result.entropies)} steps in {result.seconds:.1f} s, entropy {first} -> {last}")
        if accs:
            print(f"average accuracy {accs[0]['average']:.4f} (step 0) -> {accs[-1]['average']:.4f} "
                  f"(step {accs[-1]['step']})")
        print(f"wrote {result.out} (coefficients: {result.out}/adapt_coefficients.json)")
    return 0
