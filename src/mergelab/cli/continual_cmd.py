"""``mergelab continual init|add|export|status``: a durable continual-merging state folder."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    from mergelab.cli._help import examples
    from mergelab.cli.merge_cmd import parse_sets

    parser = sub.add_parser("continual", help="merge models one at a time into a state folder")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                    help="init a state folder, add models, export the merged model, show status")
    state_help = "the state folder (created by init; every later step reads and updates it)"

    init = actions.add_parser("init", help="create a state folder for a method and base model",
                              **examples("mergelab continual init state/ --method opcm --base all-minilm-l6-v2",
                                         "mergelab continual init state/ --method continual_ties --base base/ "
                                         "--set density=0.2"))
    init.add_argument("state_dir", help=state_help)
    init.add_argument("--method", required=True, help="opcm, continual_ta, continual_ties or swa")
    init.add_argument("--base", required=True, help="base (pre-trained) model: path or backbone name")
    init.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                      help="hyperparameter, e.g. --set alpha=0.5 (repeat)")
    init.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    init.set_defaults(run=lambda a: _init(a, parse_sets(a.sets)))

    add = actions.add_parser("add", help="merge one more model into the state (atomic)",
                             **examples("mergelab continual add state/ experts/sentiment/ --name sentiment",
                                        "mergelab continual add state/ experts/sentiment/ --force   # again"))
    add.add_argument("state_dir", help=state_help)
    add.add_argument("model", help="the fine-tuned model to merge in: path or backbone name")
    add.add_argument("--name", help="name recorded for this model (default: its path)")
    add.add_argument("--force", action="store_true", help="add a model even if its content was added before")
    add.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    add.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors (no progress bar)")
    add.set_defaults(run=_add)

    export = actions.add_parser("export", help="write the current merged model",
                                **examples("mergelab continual export state/ --out merged/",
                                           "mergelab continual export state/ --out merged.safetensors --overwrite"))
    export.add_argument("state_dir", help=state_help)
    export.add_argument("--out", required=True, help="output folder, or a .safetensors file")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out atomically")
    export.set_defaults(run=_export)

    status = actions.add_parser("status", help="print method, step and models added",
                                **examples("mergelab continual status state/",
                                           "mergelab continual status ~/runs/opcm-state"))
    status.add_argument("state_dir", help=state_help)
    status.add_argument("--verify", action="store_true",
                        help="also read every state tensor and check its checksum (reads the whole state)")
    status.set_defaults(run=_status)


def _init(args: argparse.Namespace, hparams: dict[str, Any]) -> int:
    from mergelab.continual import ContinualMerger

    merger = ContinualMerger(args.method, args.base, device=args.device, **hparams)
    merger.save(args.state_dir)
    print(f"initialised {args.state_dir}: {args.method} {merger.hparams}")
    return 0


def _add(args: argparse.Namespace) -> int:
    from mergelab.continual import ContinualMerger

    merger = ContinualMerger.load(args.state_dir, device=args.device)
    # the bar goes to stderr, and only to a terminal (as merge's)
    merger.add(args.model, name=args.name or args.model, force=args.force, progress=False if args.quiet else None)
    if not args.quiet:
        print(f"step {merger.step}: added {args.name or args.model}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from mergelab.continual import ContinualMerger

    path = ContinualMerger.load(args.state_dir).export(args.out, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from mergelab.continual import ContinualMerger

    merger = ContinualMerger.load(args.state_dir)  # checks the manifest and the files' headers
    if args.verify:
        merger.verify()
    print(f"method  {merger.method} {merger.hparams}\nbase    {merger.base_ref}\nstep    {merger.step}")
    for index, entry in enumerate(merger.added, 1):
        print(f"  {index:>3}  {entry['name']}  sha256:{entry['sha256'][:16]}")
    if merger.legacy:
        print("content no checksums (state written before they were recorded; the next add records them)")
    else:
        print("content " + ("every tensor matches its checksum" if args.verify else "not read (--verify checks every tensor)"))
    return 0
