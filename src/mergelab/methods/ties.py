"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023, arXiv:2306.01708).

Algorithm 1: trim each task vector to its top-``density`` magnitudes, elect a sign per parameter
by mass (``sign(sum_t trimmed_t)``), take the disjoint mean of the entries agreeing with it, and
add ``scaling`` times the result: ``theta = theta_0 + scaling * disjoint_merge(trim(tau))``.

Follows the official code (prateeky2806/ties-merging, src/utils/merge_utils.py: ``topk_values_mask``,
``resolve_sign``, ``resolve_zero_signs``, ``disjoint_merge``), which FusionBench ports unchanged:

* ``scope="global"`` (default, official/FusionBench): the top-k is taken over the *whole flattened*
  task vector of each model, and parameters whose elected sign is 0 get the model-wide majority
  sign. We compute both exactly with streaming passes (``engine.select``), never holding the
  flattened vectors. ``scope="tensor"`` applies the same algorithm per tensor (mergekit's choice).
* ``threshold="official"`` (default) keeps ``|tau| >= kthvalue(d - int(d * density))``, i.e. one
  entry more than an exact top-k; ``threshold="exact"`` keeps exactly ``int(d * density)``.
* ``merge_func``: ``"mean"`` (disjoint mean, the paper), ``"sum"`` (FusionBench default), ``"max"``.

Defaults ``density=0.2, scaling=1.0, merge_func="mean"``: the paper's setting without validation
data (top-20 %, lambda = 1; Sec. 6 and App. C.4). FusionBench instead uses ``merge_func="sum",
scaling=0.3`` (config/method/ties_merging.yaml); pass those to reproduce it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mergelab.engine.select import StreamingKth
from mergelab.methods._common import disjoint_merge, elect_sign, keep_rank, kth_threshold
from mergelab.methods.registry import TensorCtx, register


@dataclass(frozen=True)
class TiesStats:
    thresholds: torch.Tensor  # (T,) smallest kept magnitude per task vector
    majority_sign: float  # sign of the sum of elected signs over the whole model


class TiesGlobalStats:
    """Passes 0-1: exact per-task magnitude threshold; pass 2 (last): model-wide majority sign."""

    def __init__(self, hp: dict[str, Any], n_models: int):
        self.density, self.rule, self.n_models = hp["density"], hp["threshold"], n_models
        self.selector = StreamingKth(n_models)
        self.keep_all = hp["density"] >= 1.0 and self.rule == "official"
        self.n_passes = 1 if self.keep_all else 3
        self.thresholds = torch.zeros(n_models)
        self.sign_total = 0.0
        self.rank = 0

    def observe(self, index: int, name: str, taus: torch.Tensor, base: torch.Tensor) -> None:
        flat = taus.reshape(self.n_models, -1)
        if index < self.n_passes - 1:
            self.selector.observe(flat.abs())
            return
        keep = flat.abs() >= self.thresholds.to(flat.device, flat.dtype)[:, None]
        self.sign_total += float(torch.sign((flat * keep).sum(dim=0)).sum())

    def end_pass(self, index: int) -> None:
        if index == 0 and not self.keep_all:
            self.rank = keep_rank(self.selector.count, self.density, self.rule)
            if 1 <= self.rank <= self.selector.count:
                self.selector.end_pass0([[self.rank]] * self.n_models)
        elif index == 1:
            if self.rank > self.selector.count:
                self.thresholds = torch.full((self.n_models,), float("inf"))
            elif self.rank >= 1:
                self.thresholds = torch.tensor([row[0] for row in self.selector.values()], dtype=torch.float64)

    def result(self) -> TiesStats:
        return TiesStats(self.thresholds, float(torch.sign(torch.tensor(self.sign_total))))


def _check(hp: dict[str, Any], n_models: int) -> None:
    if not 0.0 <= hp["density"] <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {hp['density']}")


def _stats(hp: dict[str, Any], n_models: int) -> TiesGlobalStats | None:
    return TiesGlobalStats(hp, n_models) if hp["scope"] == "global" else None


@register(
    "ties",
    defaults={"density": 0.2, "scaling": 1.0, "merge_func": "mean", "scope": "global", "threshold": "official"},
    choices={"merge_func": ("mean", "sum", "max"), "scope": ("global", "tensor"), "threshold": ("official", "exact")},
    summary="trim to top-density magnitudes, elect signs, disjoint mean",
    source="Yadav et al. NeurIPS 2023 Alg. 1; official prateeky2806/ties-merging merge_utils.py; "
    "defaults density 0.2, scaling 1.0, mean (paper, no-validation setting)",
    check=_check,
    stats=_stats,
    linear_in_scaling=True,
)
def ties(
    taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, *,
    density: float, scaling: float, merge_func: str, scope: str, threshold: str,
) -> torch.Tensor:
    flat = taus.reshape(taus.shape[0], -1)  # (T, n)
    if scope == "global":
        thresholds = ctx.stats.thresholds.to(flat.device, flat.dtype)
        majority: float | None = ctx.stats.majority_sign
    else:
        thresholds = kth_threshold(flat.abs(), keep_rank(flat.shape[1], density, threshold))
        majority = None
    trimmed = flat * (flat.abs() >= thresholds[:, None])
    sign = elect_sign(trimmed, majority)
    return (disjoint_merge(trimmed, sign, merge_func) * scaling).reshape(base.shape)
