"""``mergelab report DB --out report.md``: Markdown tables and PNG plots from an experiment results database."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    from mergelab.cli._help import examples

    parser = sub.add_parser("report", help="write a Markdown report with PNG plots from an experiment database",
                            **examples("mergelab report experiments/results/cart.sqlite --out cart.md",
                                       "mergelab report experiments/results/ --experiment cart --out cart.md"))
    parser.add_argument("db", help="results database written by `mergelab experiment`, or a folder of them")
    parser.add_argument("--out", default="report.md", help="Markdown file (plots go to <stem>_files/ beside it)")
    parser.add_argument("--experiment", help="only this experiment (its config `name`)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mergelab.report import write_report

    out = write_report(args.db, args.out, experiment=args.experiment)
    print(f"wrote {out}")
    return 0
