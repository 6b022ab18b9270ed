"""Merging search candidates in memory, with one merge shared by every candidate of a linear family.

A method that declares ``linear_in_scaling`` merges to ``base + scaling * g`` with ``g`` independent of the
scaling, so a lambda sweep needs ``g`` once (a merge at scaling 1) and then one cheap recombination per
lambda. Weight Weaving with ``pooling="average"`` over such an inner method is likewise
``base + (sum_t tau_t + (sum_i lambda_i) g) / (T + K)`` (its closed form), so every ``lambdas`` needs the
same ``g`` and ``sum_t tau_t``. Anything else is merged in full with :func:`mergelab.merge` (in memory,
never written). The recombination is done in float64 from the float32 merges and rounded once, so it
equals the direct merge up to float rounding (tests/search/test_candidates.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

State = dict[str, torch.Tensor]


def family(method: str, resolved: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]] | None:
    """``(kind, method, params at scaling 1)`` of a candidate that can be recombined, else None.

    ``kind`` is ``"scale"`` (a linear method: ``base + scaling * g``) or ``"weave"`` (average pooling over a
    linear inner method: ``g`` is the inner method's merge at scaling 1).
    """
    from mergelab.methods.registry import get_method

    m = get_method(method)
    if m.linear_in_scaling and "scaling" in resolved:
        return "scale", method, {**resolved, "scaling": 1.0}
    if method == "weave" and resolved.get("pooling") == "average" and resolved.get("path") == "auto":
        from mergelab.methods.weave import split

        inner, inner_hp = split(resolved)
        if inner.linear_in_scaling:
            return "weave", inner.name, {**inner_hp, "scaling": 1.0}
    return None


class CandidateMerger:
    """``merger(method, params) -> state dict``: one candidate merged in memory.

    Keeps the merges at scaling 1 of the last ``keep`` families (one model's size each), so a sweep over
    the scaling costs one merge.

    Args:
        base: the base model (any model-like input).
        models: the fine-tuned models.
        device: where :func:`mergelab.merge` computes.
        fast: recombine linear families (False: every candidate is a full merge, the reference).
        keep: how many families' merges to keep.
    """

    def __init__(self, base: Any, models: list[Any], *, device: str = "cpu", fast: bool = True, keep: int = 2):
        self.base, self.models, self.device, self.fast, self.keep = base, list(models), device, fast, keep
        self._merged: OrderedDict[str, State] = OrderedDict()
        self._base_state: State | None = None
        self.merges = 0  # full merges done (what the fast path saves)

    def __call__(self, method: str, params: Mapping[str, Any]) -> State:
        from mergelab.experiment.config import canonical_json
        from mergelab.methods.registry import get_method

        resolved = get_method(method).resolve(params, len(self.models))
        fam = family(method, resolved) if self.fast else None
        if fam is None:
            return self._merge(method, dict(params))
        kind, inner, at_one = fam
        g = self._cached(canonical_json([inner, at_one]), inner, at_one)
        base = self._base()
        if kind == "scale":
            return combine(base, g, None, float(resolved["scaling"]), 1.0)
        total = self._cached(canonical_json(["task_arithmetic", 1.0]), "task_arithmetic", {"scaling": 1.0})
        n_all = len(self.models) + len(resolved["lambdas"])
        return combine(base, g, total, sum(resolved["lambdas"]) / n_all, 1.0 / n_all)

    def _merge(self, method: str, params: dict[str, Any]) -> State:
        from mergelab import api

        self.merges += 1
        merged = api.merge(method, self.base, self.models, device=self.device, progress=False, **params)
        assert isinstance(merged, dict)
        return merged

    def _cached(self, key: str, method: str, params: dict[str, Any]) -> State:
        if key in self._merged:
            self._merged.move_to_end(key)
            return self._merged[key]
        merged = self._merge(method, params)
        self._merged[key] = merged
        while len(self._merged) > max(self.keep, 2):
            self._merged.popitem(last=False)
        return merged

    def _base(self) -> State:
        if self._base_state is None:
            from mergelab.io.sources import open_source

            source = open_source(self.base)
            try:
                self._base_state = {name: source.get(name) for name in source.specs}
            finally:
                source.close()
        return self._base_state


def combine(base: State, merged_g: State, merged_total: State | None, a: float, b: float) -> State:
    """``base + a * g + b * total`` per floating tensor, where ``g = merged_g - base`` and ``total =
    merged_total - base`` (deltas recovered from merged models), in float64, rounded once to the base's dtype;
    non-floating tensors are the base's."""
    out = {}
    for name, ref in base.items():
        if not ref.is_floating_point():
            out[name] = ref
            continue
        base64 = ref.double()
        delta = a * (merged_g[name].double() - base64)
        if merged_total is not None:
            delta += b * (merged_total[name].double() - base64)
        out[name] = (base64 + delta).to(ref.dtype)
    return out
