"""``mergelab zoo build SUITE`` / ``mergelab zoo list``: fine-tune (or reuse) a suite's experts; list zoos."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    from mergelab.cli._help import examples

    parser = sub.add_parser("zoo", help="build or list the offline model zoo (fine-tuned experts per task)")
    zoo_sub = parser.add_subparsers(dest="zoo_command", required=True, metavar="ACTION", help="build or list")
    build = zoo_sub.add_parser("build", help="fine-tune (or reuse from the cache) one expert per task of a suite",
                               **examples("mergelab zoo build mt8 --quick          # 3 experts, ~1 min on 2 cores",
                                          "mergelab zoo build mt8 --device cuda     # 8 experts, ~15 min on 2 cores",
                                          "mergelab zoo build my_suite.yaml --backbone all-mpnet-base-v2"))
    build.add_argument("suite", help="built-in suite (mt8, noun-ci-5-seq, vader-domains, ...) or a suite YAML file")
    build.add_argument("--quick", action="store_true", help="the small version (tests, demos)")
    build.add_argument("--backbone", default="all-minilm-l6-v2",
                       help="all-minilm-l6-v2 (default), all-mpnet-base-v2, or a local model folder")
    build.add_argument("--cache-dir", help="cache root (default $MERGELAB_CACHE or ~/.cache/mergelab)")
    build.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    build.add_argument("--epochs", type=int, help="override the recipe's epochs")
    build.add_argument("--json", action="store_true", help="print the zoo as JSON")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.set_defaults(run=_build)
    listing = zoo_sub.add_parser("list", help="built-in suites, backbone folders and the zoos built in the cache",
                                 **examples("mergelab zoo list", "mergelab zoo list --json --cache-dir /data/cache"))
    listing.add_argument("--cache-dir", help="cache root (default $MERGELAB_CACHE or ~/.cache/mergelab)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=_list)


def _build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from mergelab.errors import MergelabError
    from mergelab.zoo import build_zoo
    from mergelab.zoo.train import Recipe

    if args.epochs is not None and args.epochs < 1:
        raise MergelabError("--epochs must be at least 1")
    recipe = replace(Recipe(), epochs=args.epochs) if args.epochs else None
    zoo = build_zoo(args.suite, backbone=args.backbone, cache_dir=args.cache_dir, quick=args.quick,
                    device=args.device, progress=not args.no_progress, recipe=recipe)
    if args.json:
        print(json.dumps({"suite": zoo.suite, "backbone": zoo.backbone, "base": str(zoo.base), "path": str(zoo.path),
                          "experts": {k: str(v) for k, v in zoo.experts.items()},
                          "accuracy": zoo.expert_accuracy, "zero_shot": zoo.zero_shot}, indent=2))
        return 0
    print(f"zoo {zoo.suite} ({zoo.backbone}) at {zoo.path}")
    print(f"{'task':<16} {'zero-shot':>9} {'expert':>7}  folder")
    for task, folder in zoo.experts.items():
        print(f"{task:<16} {zoo.zero_shot[task]:>9.4f} {zoo.expert_accuracy[task]:>7.4f}  {folder}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from mergelab.zoo import list_zoos, suite_names

    zoos = list_zoos(args.cache_dir)
    backbones = _backbones(args.cache_dir)
    if args.json:
        folders = {name: folder for name, (folder, _) in backbones.items()}
        print(json.dumps({"suites": suite_names(), "backbones": folders, "built": zoos}, indent=2))
        return 0
    print("built-in suites (add -quick for the small version): " + ", ".join(suite_names()))
    print("backbones (usable wherever a model path goes, e.g. --base all-minilm-l6-v2):")
    for name, (folder, problem) in backbones.items():
        print(f"  {name:<18} {folder or problem}")
    if not zoos:
        print("no zoo built yet (mergelab zoo build SUITE)")
    for zoo in zoos:
        accs = [e["accuracy"] for e in zoo["experts"].values()]
        mean = sum(accs) / len(accs) if accs else float("nan")
        print(f"{zoo['suite']:<22} {zoo['backbone']:<18} {len(accs)} experts, mean accuracy {mean:.4f}  {zoo['path']}")
    return 0


def _backbones(cache_dir: str | None) -> dict[str, tuple[str | None, str]]:
    """Each backbone name -> (its folder, "") or (None, why it is not there)."""
    from mergelab.errors import MergelabError
    from mergelab.zoo.backbones import NAMES, backbone_folder

    out: dict[str, tuple[str | None, str]] = {}
    for name in NAMES:
        try:
            out[name] = (str(backbone_folder(name, cache_dir)), "")
        except MergelabError as err:
            out[name] = (None, err.message)
    return out
