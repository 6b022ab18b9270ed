"""Search spaces: which hyperparameters a search tunes, over which values (pure; no merging).

A dimension is either a list of choices or a range::

    "0.1:1.0:0.1"   range 0.1, 0.2, ..., 1.0 (a grid; TPE draws on the same steps)
    "0.1:1.0"       continuous range (TPE only)
    "1e-3:1:log"    log-uniform range (TPE only)
    "0.1,0.2,0.5"   choices (each parsed as a YAML scalar: numbers, true/false, names)

and in Python a list (choices) or ``{"low": .., "high": .., "step": ..}`` / ``{"low": .., "high": .., "log": true}``.
Integer ranges (``1:8:1``) stay integers. Every value is checked against the method's registry ``resolve``
before anything runs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mergelab.errors import MergelabError


@dataclass(frozen=True)
class Dim:
    """One tuned hyperparameter: ``choices``, or a range ``[low, high]`` with an optional ``step`` or ``log``."""

    name: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @property
    def integer(self) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high, self.step))

    def values(self) -> list[Any]:
        """Every value a grid visits (in order); a range without a step has none."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None or self.low is None or self.high is None:
            raise MergelabError(f"search space {self.name}: a grid needs choices or a range with a step "
                                f"(e.g. {self.name}=0.1:1.0:0.1)")
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        if self.integer:
            return [int(self.low + i * self.step) for i in range(count)]
        return [_round(self.low + i * self.step) for i in range(count)]

    def to_json(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "step": self.step, "log": self.log}


def _round(value: float) -> float:
    """Grid values without float drift: 0.1 + 2 * 0.1 -> 0.3, not 0.30000000000000004."""
    return float(f"{value:.12g}")


def parse_dim(name: str, spec: Any) -> Dim:
    """A dimension from a CLI string, a list or a mapping (see the module docstring)."""
    where = f"search space {name}"
    if isinstance(spec, str):
        if ":" in spec:
            parts = spec.split(":")
            if len(parts) not in (2, 3):
                raise MergelabError(f"{where}: {spec!r} is not LOW:HIGH, LOW:HIGH:STEP or LOW:HIGH:log")
            mapping: dict[str, Any] = {"low": _scalar(parts[0], where), "high": _scalar(parts[1], where)}
            if len(parts) == 3:
                if parts[2].strip() == "log":
                    mapping["log"] = True
                else:
                    mapping["step"] = _scalar(parts[2], where)
            spec = mapping
        else:
            spec = [_scalar(part, where) for part in spec.split(",")]
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise MergelabError(f"{where}: no choices")
        return Dim(name, choices=tuple(spec))
    if not isinstance(spec, Mapping):
        raise MergelabError(f"{where}: a dimension is a list of choices or a range {{low, high, step | log}}")
    unknown = sorted(set(spec) - {"low", "high", "step", "log"})
    if unknown:
        raise MergelabError(f"{where}: unknown key {unknown[0]!r} (low, high, step, log)")
    low, high, step, log = spec.get("low"), spec.get("high"), spec.get("step"), spec.get("log", False)
    for key, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value)):
            raise MergelabError(f"{where}: {key} must be a finite number, got {value!r}")
    if low is None or high is None or not low <= high:
        raise MergelabError(f"{where}: a range needs low <= high, got {low!r}:{high!r}")
    if step is not None and step <= 0:
        raise MergelabError(f"{where}: step must be positive, got {step!r}")
    if not isinstance(log, bool) or (log and (step is not None or low <= 0)):
        raise MergelabError(f"{where}: log ranges need 0 < low and no step")
    return Dim(name, low=low, high=high, step=step, log=log)


def _scalar(text: str, where: str) -> Any:
    import yaml

    try:
        value = yaml.safe_load(text.strip())
    except yaml.YAMLError:
        raise MergelabError(f"{where}: cannot read {text!r}") from None
    if value is None:
        raise MergelabError(f"{where}: empty value in {text!r}")
    return value


def parse_space(space: Mapping[str, Any]) -> dict[str, Dim]:
    return {name: parse_dim(name, spec) for name, spec in space.items()}


def default_space(method: str) -> dict[str, Dim]:
    """Without ``space``: the method's ``scaling`` over Weight Weaving's lambda range for it (Sec. 4,
    multi-task: TIES 0.1..1.5, PCB 0.1..2.5, TSV 0.5..2.0, Iso-C 0.1..2.0, others 0.1..1.0; step 0.1)."""
    from mergelab.methods.registry import get_method
    from mergelab.methods.weave import search_space

    if "scaling" not in get_method(method).defaults:
        raise MergelabError(f"method {method!r} has no scaling; give the space to search (e.g. --space NAME=0.1:1:0.1)")
    return {"scaling": Dim("scaling", choices=tuple(search_space(method, "multitask")))}


def grid(space: Mapping[str, Dim]) -> list[dict[str, Any]]:
    """Every point of the Cartesian product, ``scaling`` varying fastest (so that candidates sharing
    everything but the scaling follow each other: one merge serves them all, see candidates.py)."""
    names = sorted(space, key=lambda n: (n == "scaling", list(space).index(n)))
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(space[n].values() for n in names))]


def check_space(method: str, params: Mapping[str, Any], space: Mapping[str, Dim], n_models: int) -> None:
    """Every choice and each range's ends resolve with the method (names, types, ranges); raises MergelabError."""
    from mergelab.methods.registry import get_method

    m = get_method(method)
    clash = sorted(set(params) & set(space))
    if clash:
        raise MergelabError(f"{clash[0]} is both fixed (--set) and searched (--space)")
    for dim in space.values():
        probes = list(dim.choices) if dim.choices is not None else [dim.low, dim.high]
        for value in probes:
            try:
                m.resolve({**params, dim.name: value}, n_models)
            except MergelabError as err:
                raise MergelabError(f"search space {dim.name}={value!r}: {err.message}") from None
