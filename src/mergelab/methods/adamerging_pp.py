"""AdaMerging++ (Yang et al., AdaMerging, ICLR 2024, Sec. 3.2): AdaMerging over TIES-processed task vectors,
the merge with given coefficients; ``mergelab adapt`` learns them (``mergelab.adapt``)::

    theta = theta_0 + sum_t lambda_t^l * tau_t^TIES

``tau_t^TIES`` as the official ``src/main_{task,layer}_wise_adamergingpp.py`` builds it with
``ties_merging_split(tv_flat_checks, reset_thresh=20, merge_func="dis-sum")`` (``src/ties_merging_utils.py``):
each whole flattened task vector trimmed to its top ``density`` magnitudes (``topk_values_mask``: the official
threshold keeps ``|tau| >= kthvalue(N - int(N * density))``, ``threshold="exact"`` exactly ``int(N * density)``
entries), signs elected by mass (zero sums get the model-wide majority sign, ``resolve_zero_signs``), and the
entries of each task that agree with the elected sign kept. Equal coefficients ``c`` give
``ties(merge_func="sum", scaling=c)``.

Both model-wide quantities are computed exactly in streaming passes: the thresholds by TIES' own collector
(:class:`mergelab.ops.thresholds.ThresholdPasses`), then one pass summing the elected signs for the majority.

Defaults: ``density=0.2`` (official ``K = 20``), ``init=0.3`` (official ``prior``), ``granularity="layer"``.
"""

from __future__ import annotations

from typing import Any

import torch

from mergelab.methods.registry import Resolution, Streaming, TensorCtx, register
from mergelab.ops import coefficients as coef
from mergelab.ops.adaptive import combine, majority_sign, sign_sum, ties_selected
from mergelab.ops.thresholds import ThresholdPasses

LEARNED = ("granularity", "density", "threshold")


class MajorityStats:
    """TIES' threshold passes, then one pass for the model-wide majority of the elected signs."""

    thread_safe = False

    def __init__(self, hp: dict[str, Any], n_models: int):
        self.ties = ThresholdPasses(hp["density"], hp["threshold"], n_models)
        self.total = 0.0

    @property
    def n_passes(self) -> int:
        return self.ties.n_passes + 1  # re-read by the engine after each pass

    def observe(self, index: int, name: str, taus: torch.Tensor, base: torch.Tensor) -> None:
        if index < self.ties.n_passes:
            self.ties.observe(index, name, taus, base)
        else:
            self.total += sign_sum(taus, self.ties.thresholds)

    def end_pass(self, index: int) -> None:
        if index < self.ties.n_passes:
            self.ties.end_pass(index)

    def result(self) -> tuple[torch.Tensor, float]:
        return self.ties.thresholds, majority_sign(self.total)


def _check(hp: dict[str, Any], n_models: int) -> None:
    if not 0.0 <= hp["density"] <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {hp['density']}")
    coef.check_file(hp, "adamerging_pp", n_models)


@register(
    "adamerging_pp",
    defaults={"coefficients": None, "init": 0.3, "granularity": "layer", "density": 0.2, "threshold": "official"},
    choices={"granularity": coef.GRANULARITIES, "threshold": ("official", "exact")},
    summary="AdaMerging++: learned task-/layer-wise coefficients over TIES-trimmed, sign-agreeing task vectors",
    source="Yang et al. ICLR 2024 (AdaMerging++); official EnnengYang/AdaMerging main_*_adamergingpp.py with "
    "ties_merging_split(K=20, dis-sum): density 0.2, init 0.3 (official prior)",
    check=_check,
    streaming=Streaming(stats=lambda hp, n: MajorityStats(hp, n)),
    resolution=Resolution(fill_presets=lambda hp: coef.fill_from_file(hp, "adamerging_pp", LEARNED)),
)
def adamerging_pp(taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, *, coefficients: Any, init: float,
                  granularity: str, density: float, threshold: str) -> torch.Tensor:
    table = None if coefficients is None else coef.load(coefficients)
    thresholds, majority = ctx.stats
    anchor, deltas = ties_selected(taus, thresholds, majority)
    return combine(anchor, deltas, coef.row(table, ctx.name, granularity, taus.shape[0], init))
