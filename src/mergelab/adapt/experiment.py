"""The experiment runner's hook: a run of ``adamerging``, ``adamerging_pp`` or ``cart_pp`` without ``coefficients``
adapts them first (on the suite's unlabelled test inputs, the papers' protocol) and scores the adapted model.

The config's top-level ``adapt:`` mapping sets the adaptation's options (``steps``, ``lr``, ``batch_size``,
``batches``, ``clamp``, ``seed``, ``unlabelled``, ``deltas_dtype``, ``max_len``, ``eval_every``; :mod:`.optimise`
gives the defaults). They are checked when the config is read, and the full options (defaults filled in) are
part of each adapted run's hash: changing ``steps`` makes new runs instead of reusing rows adapted otherwise.
The row stores the learned coefficients and the entropy/accuracy trace beside the accuracies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mergelab.adapt import METHODS
from mergelab.errors import MergelabError

OPTIONS = ("steps", "lr", "batch_size", "batches", "clamp", "seed", "unlabelled", "deltas_dtype", "max_len",
           "eval_every")


def adapts(method: str, params: Mapping[str, Any]) -> bool:
    """Whether a run of ``method`` with ``params`` learns its coefficients (no ``coefficients`` given)."""
    return method in METHODS and params.get("coefficients") is None


def resolve_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The config's ``adapt:`` mapping with every default filled in; MergelabError on an unknown or bad option."""
    from mergelab.adapt.model import DELTA_DTYPES
    from mergelab.adapt.optimise import Options

    given = dict(options or {})
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise MergelabError(f"unknown option(s) {unknown}; options: {', '.join(OPTIONS)}")
    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Options) if f.name in OPTIONS}
    full = defaults | {"unlabelled": "test", "deltas_dtype": "float32", "eval_every": -1} | given
    if full["unlabelled"] not in ("test", "train"):
        raise MergelabError(f"unlabelled must be test or train in an experiment, got {full['unlabelled']!r}")
    if full["deltas_dtype"] not in DELTA_DTYPES:
        raise MergelabError(f"deltas_dtype must be one of {', '.join(DELTA_DTYPES)}, got {full['deltas_dtype']!r}")
    if not isinstance(full["clamp"], bool):
        raise MergelabError(f"clamp must be true or false, got {full['clamp']!r}")
    Options(**{k: v for k, v in full.items() if k in defaults}).check()
    return full


def merged_for_run(method: str, params: Mapping[str, Any], zoo: Any, tasks: list[str], device: str,
                   options: Mapping[str, Any] | None) -> tuple[Any, dict[str, Any] | None]:
    """The merged state dict of one experiment run, and (adapted runs) the coefficients and trace to store."""
    from mergelab import api
    from mergelab.adapt.run import adapt

    models = [zoo.experts[t] for t in tasks]
    if not adapts(method, params):
        return api.merge(method, zoo.base, models, device=device, progress=False, **params), None
    full = resolve_options(options)
    cache_dir = zoo.path.parents[2] if getattr(zoo, "path", None) is not None else None
    result = adapt(method, zoo, tasks=tasks, device=device, progress=False, cache_dir=cache_dir,
                   **full, **params)
    return result.merged, {"coefficients": result.payload(), "trace": result.trace,
                           "seconds": round(result.seconds, 3)}
