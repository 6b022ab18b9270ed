"""``mergelab methods``: every registered method with its defaults and sources."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    from mergelab.cli._help import examples

    parser = sub.add_parser("methods", help="list merging methods, their defaults and sources",
                            **examples("mergelab methods", "mergelab methods --json"))
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mergelab.methods.registry import all_methods

    methods = all_methods()
    if args.json:
        rows = {
            name: {"defaults": dict(m.defaults), "choices": {k: list(v) for k, v in m.choices.items()},
                   "presets": dict(m.presets), "summary": m.summary, "source": m.source}
            for name, m in methods.items()
        }
        print(json.dumps(rows, indent=2))
        return 0
    for name, method in methods.items():
        print(f"{name}: {method.summary}")
        for key, value in method.defaults.items():
            options = method.choices.get(key)
            suffix = f"  (one of {', '.join(map(str, options))})" if options else ""
            print(f"    {key} = {value!r}{suffix}")
        for preset, setting in method.presets.items():
            print(f"    preset {preset}: {setting}")
        print(f"    source: {method.source}")
    return 0
