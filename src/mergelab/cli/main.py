"""``mergelab`` command line: parses arguments, calls the public API, prints. Bad input exits 2."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from mergelab import threads
from mergelab.errors import MergelabError
from mergelab.version import __version__


def build_parser() -> argparse.ArgumentParser:
    from mergelab.cli import (
        adapt_cmd,
        continual_cmd,
        eval_cmd,
        experiment_cmd,
        merge_cmd,
        methods_cmd,
        report_cmd,
        search_cmd,
        zoo_cmd,
    )
    from mergelab.cli._help import examples

    parser = argparse.ArgumentParser(prog="mergelab", description="Merge fine-tuned models without retraining.",
                                     **examples("mergelab methods",
                                                "mergelab merge --method ties --base base/ --model a/ --model b/ "
                                                "--out merged/",
                                                "mergelab COMMAND --help     # examples for each command"))
    parser.add_argument("--version", action="version", version=f"mergelab {__version__}",
                        help="print the version and exit")
    parser.add_argument("--threads", metavar="N|auto|legacy", help="threads to compute on (default auto: the CPUs "
                        "this process may use -- affinity, cgroup quota, OMP_NUM_THREADS; env MERGELAB_THREADS); "
                        "may also follow the command")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of")
    merge_cmd.add_parsers(sub)
    methods_cmd.add_parser(sub)
    continual_cmd.add_parser(sub)
    zoo_cmd.add_parser(sub)
    eval_cmd.add_parser(sub)
    adapt_cmd.add_parser(sub)
    experiment_cmd.add_parser(sub)
    report_cmd.add_parser(sub)
    search_cmd.add_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same clean-up runs."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(threads.hoist_threads(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(level=logging.WARNING, format="mergelab: %(message)s")
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        threads.apply(threads.choose(args.threads))  # torch, BLAS and mergelab's workers: one budget
        return int(args.run(args) or 0)
    except MergelabError as err:
        print(f"mergelab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C (130) or SIGTERM (143): the writer has removed its temporaries
        said = err.args[0] if err.args and isinstance(err.args[0], str) else "interrupted; nothing was written"
        print(f"mergelab: {said}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
