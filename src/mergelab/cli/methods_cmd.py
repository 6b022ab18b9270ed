"""``mergelab methods``: every registered method, then every continual rule, with defaults and sources."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any


def add_parser(sub: Any) -> None:
    from mergelab.cli._help import examples

    parser = sub.add_parser("methods", help="list merging methods and continual rules, their defaults and sources",
                            **examples("mergelab methods", "mergelab methods --json", "mergelab methods --continual --json"))
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--continual", action="store_true",
                        help="only the continual rules (`mergelab continual init --method NAME`)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mergelab.continual.rules import all_rules
    from mergelab.methods.registry import all_methods

    listings: list[Mapping[str, Any]] = [all_rules()] if args.continual else [all_methods()]
    if args.json:
        rows = {
            name: {"defaults": dict(m.defaults), "choices": {k: list(v) for k, v in m.choices.items()},
                   "presets": dict(getattr(m, "presets", {})), "summary": m.summary, "source": m.source}
            for name, m in listings[0].items()
        }
        print(json.dumps(rows, indent=2))
        return 0
    if not args.continual:
        listings.append(all_rules())
    for number, listing in enumerate(listings):
        if number or args.continual:
            print("continual rules (mergelab continual init --method NAME, mergelab.ContinualMerger):")
        for name, method in listing.items():
            print(f"{name}: {method.summary}")
            for key, value in method.defaults.items():
                options = method.choices.get(key)
                suffix = f"  (one of {', '.join(map(str, options))})" if options else ""
                print(f"    {key} = {value!r}{suffix}")
            for preset, setting in getattr(method, "presets", {}).items():
                print(f"    preset {preset}: {setting}")
            print(f"    source: {method.source}")
    return 0
