"""Experiment configs: YAML -> validated, expanded list of runs (pure; no merging, no evaluation).

One config is one experiment of one ``kind``:

* ``multitask``: merge the experts of each task subset, score the merged model on those tasks;
* ``domain_generalization``: hold one task out, merge the others, score the held-out task
  (weight-weaving paper Sec. 4, "Vision domain generalization", after Yang et al.);
* ``routing``: for each task, the model routed to it (a method's ``route`` hyperparameter set to the task's
  index: CART's direct routing, Eq. 5), scored on that task;
* ``continual``: :class:`mergelab.ContinualMerger` over a task order, scored after every step
  (OPCM paper Sec. 6.1: accuracy matrix, ACC and BWT, several orders);
* ``similarity``: the cosine similarity of the suite's task vectors (one run per suite).

Hyperparameters of one ``methods`` entry: ``params`` are fixed values (a list there is a list-valued
hyperparameter, e.g. weave's ``lambdas``), ``grid`` values are lists of alternatives expanded as a
Cartesian product, and ``sweep`` values are lists swept one hyperparameter at a time (the others at
``params``). Every expanded run is validated with the method's registry ``resolve`` before anything
runs; errors name the config file and key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab.adapt.experiment import adapts
from mergelab.errors import MergelabError
from mergelab.methods.registry import identity_hparams

KINDS = ("multitask", "domain_generalization", "routing", "continual", "similarity")
TOP_KEYS = {"name", "kind", "db", "suites", "zoo", "eval", "tasks", "methods", "orders", "adapt"}  # adapt: mergelab.adapt.experiment
METHOD_KEYS = {"method", "label", "params", "grid", "sweep"}


@dataclass(frozen=True)
class RunSpec:
    """One run: what to merge and score. ``key`` (what identifies it) is hashed into ``hash``."""

    experiment: str
    kind: str
    suite: str
    method: str  # "-" for similarity runs
    label: str  # how reports name it: the entry's label (default: the method) + swept values
    params: dict[str, Any]  # as written in the config
    resolved: dict[str, Any]  # defaults overlaid (the registry's resolve); part of the hash
    tasks: list[str]  # merged tasks, in order (continual: the task order)
    eval_tasks: list[str]  # scored tasks (domain generalization: the held-out one)
    subset: str  # how the subset was chosen: "all", "size=3 #2", "held_out=x", "order=random#1"
    zoo: dict[str, Any]  # backbone, quick
    group: str = ""  # the entry's label (default: the method): what sweeps and tables group by
    swept: tuple[str, ...] = ()  # hyperparameters this run takes from the entry's `sweep`
    used: dict[str, Any] = field(default_factory=dict)  # `resolved` with the preset's values filled in (stored)
    adapt: dict[str, Any] = field(default_factory=dict)  # test-time adaptation options (adapted runs only)

    def key(self) -> dict[str, Any]:
        # the experiment's name is part of the key: two configs sharing a database keep their own rows
        key = {"experiment": self.experiment, "kind": self.kind, "suite": self.suite, "zoo": self.zoo,
               "method": self.method, "hparams": self.resolved, "tasks": self.tasks, "eval_tasks": self.eval_tasks}
        if self.adapt:  # only adapted runs carry it, so every other run keeps its hash
            key["adapt"] = self.adapt
        return key

    @property
    def hash(self) -> str:
        return hashlib.sha256(canonical_json(self.key()).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "group": self.group or self.label, "swept": list(self.swept),
                "params": self.params, "subset": self.subset, "hparams_used": self.used or self.resolved, **self.key()}


@dataclass
class ExperimentConfig:
    path: Path | None
    name: str
    kind: str
    db: Path
    runs: list[RunSpec]
    device: str = "cpu"
    batch_size: int = 64
    cache_dir: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace: equal configs give equal strings (and hashes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


class SuiteTasks:
    """Task names of a suite without building it (the default; tests inject their own)."""

    def __call__(self, suite: str, quick: bool) -> list[str]:
        from mergelab.zoo import resolve_suite

        spec, _ = resolve_suite(suite, quick)
        return [t.name for t in spec.tasks]


def load_config(path: str | Path, suite_tasks: Callable[[str, bool], list[str]] | None = None) -> ExperimentConfig:
    """Read and validate ``path`` (YAML); relative ``db`` and suite-YAML paths are relative to it."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise MergelabError(f"cannot read experiment config: {err.strerror}", file=str(path)) from None
    except UnicodeDecodeError as err:
        raise MergelabError(f"not UTF-8 text (byte {err.start})", file=str(path)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise MergelabError(f"not valid YAML{where}", file=str(path)) from None
    except RecursionError:
        raise MergelabError("not valid YAML (nested too deeply)", file=str(path)) from None
    return parse_config(raw, path=path, suite_tasks=suite_tasks)


def parse_config(raw: Any, *, path: Path | None = None,
                 suite_tasks: Callable[[str, bool], list[str]] | None = None) -> ExperimentConfig:
    """Validate a config mapping and expand it into runs. Raises MergelabError naming file and key."""
    where = str(path) if path is not None else "<config>"

    def fail(key: str, message: str) -> MergelabError:
        return MergelabError(f"{key}: {message}", file=where)

    if not isinstance(raw, dict):
        raise fail("<top>", "an experiment config must be a mapping")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key (allowed: {', '.join(sorted(TOP_KEYS))})")
    kind = raw.get("kind", "multitask")
    if kind not in KINDS:
        raise fail("kind", f"{kind!r} is not one of {', '.join(KINDS)}")
    name = raw.get("name") or (path.stem if path is not None else "experiment")
    if not isinstance(name, str):
        raise fail("name", "must be a string")
    root = path.parent if path is not None else Path.cwd()
    db = raw.get("db", f"{name}.sqlite")
    if not isinstance(db, str):
        raise fail("db", "must be a path")
    zoo = _mapping(raw.get("zoo", {}), "zoo", fail)
    _only(zoo, {"backbone", "quick", "cache_dir"}, "zoo", fail)
    backbone = zoo.get("backbone", "all-minilm-l6-v2")
    quick = zoo.get("quick", False)
    if not isinstance(backbone, str):
        raise fail("zoo.backbone", "must be a string")
    if not isinstance(quick, bool):
        raise fail("zoo.quick", "must be true or false")
    ev = _mapping(raw.get("eval", {}), "eval", fail)
    _only(ev, {"device", "batch_size"}, "eval", fail)
    device = ev.get("device", "cpu")
    batch_size = ev.get("batch_size", 64)
    if device not in ("cpu", "cuda", "auto"):
        raise fail("eval.device", f"{device!r} is not cpu, cuda or auto")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise fail("eval.batch_size", "must be a positive integer")

    suites = raw.get("suites")
    if isinstance(suites, str):
        suites = [suites]
    if not isinstance(suites, list) or not suites or not all(isinstance(s, str) for s in suites):
        raise fail("suites", "must be a non-empty list of suite names or suite YAML paths")
    lookup = suite_tasks or SuiteTasks()
    suite_task_names: dict[str, list[str]] = {}
    for i, suite in enumerate(suites):
        ref = str(root / suite) if suite.endswith((".yaml", ".yml")) else suite
        try:
            suite_task_names[ref] = lookup(ref, quick)
        except MergelabError as err:
            raise fail(f"suites[{i}]", err.message) from None

    zoo_key = {"backbone": backbone, "quick": quick}
    if kind == "similarity":
        for key in ("methods", "tasks", "orders"):
            if key in raw:
                raise fail(key, "not used by kind 'similarity'")
        runs = [RunSpec(name, kind, s, "-", "cosine", {}, {}, t, [], "all", zoo_key)
                for s, t in suite_task_names.items()]
        return ExperimentConfig(path, name, kind, root / db, runs, device, batch_size, zoo.get("cache_dir"), raw)

    entries = _method_entries(raw.get("methods"), kind, fail)
    adapt_options = _adapt_options(raw, kind, fail)
    runs = []
    for suite, names in suite_task_names.items():
        for tasks, eval_tasks, subset in _subsets(raw, kind, names, fail):
            for i, entry in enumerate(entries):
                group = entry.get("label", entry["method"])
                for label, params in _expand(entry, f"methods[{i}]", fail):
                    if kind == "routing":  # the model routed to the scored task
                        if "route" in params:
                            raise fail(f"methods[{i}]", "route is set by kind 'routing' (one run per task)")
                        params = {**params, "route": names.index(eval_tasks[0])}
                    resolved = _resolve(entry["method"], params, len(tasks), kind, f"methods[{i}]", fail)
                    used = _resolve(entry["method"], params, len(tasks), kind, f"methods[{i}]", fail, presets=True)
                    swept = tuple(k for k in entry.get("sweep", {}) if k in params)
                    adapted = adapt_options if adapts(entry["method"], params) else {}
                    runs.append(RunSpec(name, kind, suite, entry["method"], label, params, resolved,
                                        list(tasks), list(eval_tasks), subset, zoo_key, group, swept, used, adapted))
    seen: dict[str, RunSpec] = {}
    for run in runs:  # two entries resolving to the same run would be computed once anyway; say so
        if run.hash in seen and seen[run.hash].label != run.label:
            raise fail("methods", f"{seen[run.hash].label!r} and {run.label!r} are the same run "
                                  f"(same method and resolved hyperparameters)")
        seen.setdefault(run.hash, run)
    unique = list({r.hash: r for r in runs}.values())
    return ExperimentConfig(path, name, kind, root / db, unique, device, batch_size, zoo.get("cache_dir"), raw)


def _adapt_options(raw: dict[str, Any], kind: str, fail: Callable[[str, str], MergelabError]) -> dict[str, Any]:
    """The ``adapt:`` options with their defaults (mergelab.adapt.experiment), checked now, not at run time."""
    from mergelab.adapt.experiment import resolve_options

    if "adapt" in raw and kind not in ("multitask", "domain_generalization"):
        raise fail("adapt", f"not used by kind {kind!r}")
    try:
        return resolve_options(_mapping(raw.get("adapt") or {}, "adapt", fail))
    except MergelabError as err:
        raise fail("adapt", err.message) from None


def _mapping(value: Any, key: str, fail: Callable[[str, str], MergelabError]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fail(key, "must be a mapping")
    return value


def _only(value: Mapping[str, Any], allowed: set[str], key: str, fail: Callable[[str, str], MergelabError]) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise fail(f"{key}.{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _method_entries(value: Any, kind: str, fail: Callable[[str, str], MergelabError]) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise fail("methods", "must be a non-empty list")
    entries = []
    for i, item in enumerate(value):
        key = f"methods[{i}]"
        entry = {"method": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
            raise fail(key, "must be a method name or a mapping with 'method'")
        _only(entry, METHOD_KEYS, key, fail)
        for part in ("params", "grid", "sweep"):
            _mapping(entry.get(part, {}), f"{key}.{part}", fail)
        for part in ("grid", "sweep"):
            for name, values in entry.get(part, {}).items():
                if not isinstance(values, list) or not values:
                    raise fail(f"{key}.{part}.{name}", "must be a non-empty list of values")
        if "label" in entry and not isinstance(entry["label"], str):
            raise fail(f"{key}.label", "must be a string")
        entries.append(entry)
    return entries


def _expand(entry: dict[str, Any], key: str,
            fail: Callable[[str, str], MergelabError]) -> list[tuple[str, dict[str, Any]]]:
    """``(label, params)`` per run: the grid's Cartesian product, each crossed with every sweep value."""
    params, grid, sweep = entry.get("params", {}), entry.get("grid", {}), entry.get("sweep", {})
    clash = sorted((set(params) & set(grid)) | (set(params) & set(sweep)) | (set(grid) & set(sweep)))
    if clash:
        raise fail(f"{key}.{clash[0]}", "given in more than one of params / grid / sweep")
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    swept: list[dict[str, Any]] = [{name: v} for name, values in sweep.items() for v in values] or [{}]
    base_label = entry.get("label", entry["method"])
    out = []
    for combo in combos:
        for point in swept:
            varied = combo | point
            label = " ".join([base_label] + [f"{k}={_short(v)}" for k, v in varied.items()])
            out.append((label, params | varied))
    return out


def _short(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _resolve(method: str, params: dict[str, Any], n_models: int, kind: str, key: str,
             fail: Callable[[str, str], MergelabError], presets: bool = False) -> dict[str, Any]:
    """The registry's (or ContinualMerger's) resolve: names, types, choices, checks.

    Without ``presets`` the values a preset chooses stay ``None``, as written: run hashes (and so the
    stored results) stay what they were, and ``cart`` stays a run apart from ``cart`` with the preset's
    values spelled out; so do hyperparameters added later at the value of the method's ``compat`` (left
    out). ``presets=True`` gives the values the merge uses, stored with each run.
    """
    try:
        if kind == "continual":
            from mergelab.continual.rules import get_rule

            rule = get_rule(method)
            resolved, compat = rule.resolve(params), rule.compat
        else:
            from mergelab.methods.registry import get_method

            found = get_method(method)
            resolved = found.resolve(params, n_models, presets=presets)
            compat = found.compat_of(resolved)
    except MergelabError as err:
        raise fail(key, err.message) from None
    return resolved if presets else identity_hparams(resolved, compat)


def _subsets(raw: dict[str, Any], kind: str, names: list[str],
             fail: Callable[[str, str], MergelabError]) -> list[tuple[list[str], list[str], str]]:
    """``(merged tasks, scored tasks, description)`` for every subset / held-out task / order."""
    if kind == "domain_generalization":
        if "tasks" in raw or "orders" in raw:
            raise fail("tasks" if "tasks" in raw else "orders", "not used by kind 'domain_generalization' "
                                                                 "(every task is held out once)")
        if len(names) < 2:
            raise fail("suites", "leave-one-out needs at least 2 tasks")
        return [([t for t in names if t != held], [held], f"held_out={held}") for held in names]
    if kind == "routing":
        if "tasks" in raw or "orders" in raw:
            raise fail("tasks" if "tasks" in raw else "orders", "not used by kind 'routing' (one run per task)")
        return [(list(names), [task], f"route={task}") for task in names]
    if kind == "continual":
        if "tasks" in raw:
            raise fail("tasks", "not used by kind 'continual' (use orders)")
        return [(order, order, desc) for order, desc in _orders(raw.get("orders", ["identity"]), names, fail)]
    if "orders" in raw:
        raise fail("orders", "only used by kind 'continual'")
    specs = raw.get("tasks", ["all"])
    if not isinstance(specs, list) or not specs:
        raise fail("tasks", "must be a non-empty list of subsets")
    out: list[tuple[list[str], list[str], str]] = []
    for i, spec in enumerate(specs):
        for subset, desc in _subset(spec, names, f"tasks[{i}]", fail):
            out.append((subset, subset, desc))
    return out


def _subset(spec: Any, names: list[str], key: str,
            fail: Callable[[str, str], MergelabError]) -> list[tuple[list[str], str]]:
    if spec == "all":
        return [(list(names), "all")]
    if isinstance(spec, list):
        unknown = [t for t in spec if t not in names]
        if unknown or not spec:
            raise fail(key, f"unknown task {unknown[0]!r}; tasks: {', '.join(names)}" if unknown else "empty subset")
        return [(list(spec), "+".join(spec))]
    if not isinstance(spec, dict) or len(spec) != 1:
        raise fail(key, "a subset is 'all', a list of task names, {leave_one_out: true}, "
                        "{size: K} (every K-subset) or {random: {size: K, count: C, seed: S}}")
    (mode, arg), = spec.items()
    if mode == "leave_one_out" and arg is True:
        return [([t for t in names if t != held], f"without={held}") for held in names]
    if mode == "size":
        k = _int_in(arg, 1, len(names), f"{key}.size", fail)
        return [(list(c), f"size={k}") for c in itertools.combinations(names, k)]
    if mode == "random" and isinstance(arg, dict):
        _only(arg, {"size", "count", "seed"}, f"{key}.random", fail)
        k = _int_in(arg.get("size"), 1, len(names), f"{key}.random.size", fail)
        count = _int_in(arg.get("count", 1), 1, 10**6, f"{key}.random.count", fail)
        seed = _int_in(arg.get("seed", 0), 0, 2**63, f"{key}.random.seed", fail)
        rng = random.Random(seed)  # own generator: the same subsets on every machine and rerun
        return [(sorted(rng.sample(names, k), key=names.index), f"size={k}") for _ in range(count)]
    raise fail(key, f"unknown subset form {mode!r}")


def _orders(value: Any, names: list[str],
            fail: Callable[[str, str], MergelabError]) -> list[tuple[list[str], str]]:
    """Task orders: ``identity`` (the suite's order), an explicit list, or ``{random: C, seed: S}``."""
    if not isinstance(value, list) or not value:
        raise fail("orders", "must be a non-empty list of orders")
    out = []
    for i, spec in enumerate(value):
        key = f"orders[{i}]"
        if spec == "identity":
            out.append((list(names), "identity"))
        elif isinstance(spec, list):
            if sorted(spec) != sorted(names):
                raise fail(key, f"an order must list every task once: {', '.join(names)}")
            out.append((list(spec), "custom"))
        elif isinstance(spec, dict) and set(spec) <= {"random", "seed"} and "random" in spec:
            count = _int_in(spec["random"], 1, 10**6, f"{key}.random", fail)
            rng = random.Random(_int_in(spec.get("seed", 0), 0, 2**63, f"{key}.seed", fail))
            for j in range(count):
                order = list(names)
                rng.shuffle(order)
                out.append((order, f"random#{j}"))
        else:
            raise fail(key, "an order is 'identity', a list of every task, or {random: COUNT, seed: S}")
    return out


def _int_in(value: Any, low: int, high: int, key: str, fail: Callable[[str, str], MergelabError]) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise fail(key, f"must be an integer in [{low}, {high}], got {value!r}")
    return value
