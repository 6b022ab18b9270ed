"""The experiment runner's hook: a run of ``adamerging``, ``adamerging_pp`` or ``cart_pp`` without ``coefficients``
adapts them first (on the suite's unlabelled test inputs, the papers' protocol) and scores the adapted model;
the config's top-level ``adapt:`` mapping sets the adaptation's options (``steps``, ``lr``, ``batch_size``,
``batches``, ``clamp``, ``seed``, ``unlabelled``, ``deltas_dtype``; :mod:`.optimise` gives the defaults)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergelab.adapt import METHODS
from mergelab.errors import MergelabError

OPTIONS = ("steps", "lr", "batch_size", "batches", "clamp", "seed", "unlabelled", "deltas_dtype", "max_len")


def merged_for_run(method: str, params: Mapping[str, Any], zoo: Any, tasks: list[str], device: str,
                   options: Mapping[str, Any] | None) -> Any:
    """The merged state dict of one experiment run: adapted first when ``method`` learns its coefficients."""
    import mergelab

    models = [zoo.experts[t] for t in tasks]
    if method not in METHODS or params.get("coefficients") is not None:
        return mergelab.merge(method, zoo.base, models, device=device, progress=False, **params)
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise MergelabError(f"adapt: unknown option(s) {unknown}; options: {', '.join(OPTIONS)}")
    cache_dir = zoo.path.parents[2] if getattr(zoo, "path", None) is not None else None
    result = mergelab.adapt(method, zoo, tasks=tasks, device=device, eval_every=-1, progress=False,
                            cache_dir=cache_dir, **options, **params)
    return result.merged
