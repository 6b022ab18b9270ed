"""``mergelab merge`` and ``mergelab plan``: flags or a YAML file -> ``mergelab.merge`` / ``mergelab.plan``."""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab import threads
from mergelab.errors import MergelabError

CONFIG_KEYS = {"method", "base", "models", "parameters", "out", "device", "dtype", "max_shard_size", "overwrite"}


@dataclass(frozen=True)
class MergeJob:
    """A merge request, flat: what a YAML file or the flags say."""

    method: str
    base: str
    models: tuple[str, ...]
    parameters: dict[str, Any] = field(default_factory=dict)
    out: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    max_shard_size: int = 5 * 10**9
    overwrite: bool = False


EXAMPLES = {
    "merge": ("mergelab merge --method ties --base base/ --model a/ --model b/ --set density=0.2 --out merged/",
              "mergelab merge examples/merge_job.yaml --out merged/ --overwrite",
              "mergelab merge job.yaml --method cart      # the file's parameters (of its method) are dropped"),
    "plan": ("mergelab plan --method tsv --base all-minilm-l6-v2 --model a/ --model b/",
             "mergelab plan examples/merge_job.yaml --set scaling=0.5"),
}
MODELS_HELP = ("a model is a folder, a .safetensors / .bin / .pt file or a backbone name (all-minilm-l6-v2); "
               "relative paths in the YAML file are relative to the file's folder, those given as flags to the "
               "working directory; flags override the file, and --method other than the file's drops the "
               "file's parameters")


def add_parsers(sub: Any) -> None:
    from mergelab.cli._help import examples

    for name, help_text in (("merge", "merge models into a new checkpoint"),
                            ("plan", "validate a merge from headers alone and print its plan")):
        description = textwrap.fill(f"{help_text[0].upper()}{help_text[1:]}. {MODELS_HELP[0].upper()}{MODELS_HELP[1:]}.",
                                    width=100)  # the raw formatter (for the examples) wraps nothing itself
        parser = sub.add_parser(name, help=help_text, description=description, **examples(*EXAMPLES[name]))
        parser.add_argument("config", nargs="?", help="YAML file with method, base, models, parameters, out "
                            "(relative paths: from the file's folder)")
        parser.add_argument("--method", help="merging method (see 'mergelab methods')")
        parser.add_argument("--base", help="base (pre-trained) model: path or backbone name")
        parser.add_argument("--model", action="append", default=[], dest="models",
                            help="fine-tuned model: path or backbone name (repeat)")
        parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                            help="hyperparameter, e.g. --set density=0.2 (repeat)")
        parser.add_argument("--out", help="output folder, or a .safetensors file")
        parser.add_argument("--device", help="cpu (default) or cuda")
        parser.add_argument("--dtype", help="compute dtype: float32 (default) or float64")
        parser.add_argument("--max-shard-size", help="shard size of the output, e.g. 5GB (default), 500MB")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --out atomically")
        parser.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
        if name == "merge":
            parser.add_argument("--dry-run", action="store_true", help="validate and print the plan, write nothing")
        parser.set_defaults(run=run, dry_run=name == "plan")


def run(args: argparse.Namespace) -> int:
    import mergelab

    job = job_from_args(args)
    if job.out is None and not args.dry_run:
        raise MergelabError("no --out given: where should the merged model go?")
    options: dict[str, Any] = dict(out=job.out, device=job.device, dtype=job.dtype, overwrite=job.overwrite,
                                   max_shard_size=job.max_shard_size)
    if job.out is not None and not args.dry_run:  # before the plan checks --out (a dry run only reports them)
        from mergelab.io.leftovers import sweep

        sweep(Path(job.out))
    plan = mergelab.plan(job.method, job.base, list(job.models), **options, **job.parameters)
    if not args.quiet:
        print(f"{plan.summary()}\n{threads.ensure().describe()}")
    if args.dry_run:
        if not args.quiet:
            print("plan is valid; nothing was written (dry run)")
        return 0
    start = time.perf_counter()
    path = mergelab.merge(job.method, job.base, list(job.models), progress=not args.quiet and sys.stderr.isatty(),
                          **options, **job.parameters)
    if not args.quiet:
        print(f"wrote {path} in {time.perf_counter() - start:.1f} s")
    return 0


def job_from_args(args: argparse.Namespace) -> MergeJob:
    """YAML (if given) overlaid with the flags; raises MergelabError on anything missing or unknown.

    Relative paths in the YAML file (base, models, out) are relative to the file's folder, as in
    experiment and task YAMLs; paths given as flags are relative to the working directory.
    """
    data: dict[str, Any] = load_config(args.config) if args.config else {}
    if args.config:
        data = paths_from_file(data, Path(args.config).parent)
    if args.method and data.get("method") and args.method != data["method"] and data.get("parameters"):
        # the file's hyperparameters belong to its method: carried over they would be unknown or mean otherwise
        if not getattr(args, "quiet", False):
            print(f"note: --method {args.method} replaces the file's method {data['method']}; its parameters "
                  f"({', '.join(map(str, data['parameters']))}) are not used", file=sys.stderr)
        data["parameters"] = {}
    if args.method:
        data["method"] = args.method
    if args.base:
        data["base"] = args.base
    if args.models:
        data["models"] = list(args.models)
    params = dict(data.get("parameters") or {})
    params.update(parse_sets(args.sets))
    data["parameters"] = params
    for key in ("out", "device", "dtype", "max_shard_size"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if args.overwrite:
        data["overwrite"] = True
    for key in ("method", "base", "models"):
        if not data.get(key):
            raise MergelabError(f"missing {key}: give --{key.rstrip('s')} or put '{key}:' in the YAML file")
    return MergeJob(
        method=str(data["method"]),
        base=str(data["base"]),
        models=tuple(str(m) for m in data["models"]),
        parameters=params,
        out=str(data["out"]) if data.get("out") else None,
        device=str(data.get("device") or "cpu"),
        dtype=str(data.get("dtype") or "float32"),
        max_shard_size=parse_size(data.get("max_shard_size", 5 * 10**9)),
        overwrite=bool(data.get("overwrite", False)),
    )


def paths_from_file(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``data`` with its relative base, models and out joined to ``folder`` (the YAML file's).

    A backbone name (``all-minilm-l6-v2``) stays a name unless the folder holds a path of that name.
    """
    from mergelab.zoo.backbones import is_backbone_name

    def join(value: Any) -> Any:
        if not isinstance(value, str) or not value:
            return value
        path = Path(value).expanduser()
        if path.is_absolute():
            return str(path)
        if is_backbone_name(value) and not (folder / path).exists():
            return value
        return str(folder / path)

    out = dict(data)
    for key in ("base", "out"):
        if key in out:
            out[key] = join(out[key])
    if isinstance(out.get("models"), list):
        out["models"] = [join(m) for m in out["models"]]
    return out


def load_config(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle.read())
    except OSError as err:
        raise MergelabError(f"cannot read config: {err.strerror}", file=path) from None
    except UnicodeDecodeError as err:
        raise MergelabError(f"not UTF-8 text (byte {err.start})", file=path) from None
    except yaml.YAMLError as err:
        raise MergelabError(f"invalid YAML ({str(err).splitlines()[0]})", file=path) from None
    except RecursionError:
        raise MergelabError("invalid YAML (nested too deeply)", file=path) from None
    if not isinstance(data, dict):
        raise MergelabError("config must be a YAML mapping (method:, base:, models:, ...)", file=path)
    unknown = sorted(set(data) - CONFIG_KEYS)
    if unknown:
        raise MergelabError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(CONFIG_KEYS))}", file=path)
    if "models" in data and not isinstance(data["models"], list):
        raise MergelabError("'models' must be a list of paths", file=path)
    if data.get("parameters") is not None and not isinstance(data["parameters"], dict):
        raise MergelabError("'parameters' must be a mapping of hyperparameters", file=path)
    if not isinstance(data.get("overwrite", False), bool):
        raise MergelabError(f"'overwrite' must be true or false, got {data['overwrite']!r}", file=path)
    return data


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["density=0.2", "lambdas=[0.1, 0.2]"]`` -> typed values (parsed as YAML scalars/lists)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise MergelabError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise MergelabError(f"--set {key}: cannot parse value {raw!r}") from None
    return out


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise MergelabError(f"cannot read size {value!r} (use e.g. 5GB, 500MB or a byte count)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


