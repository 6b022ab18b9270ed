"""DARE-TIES: DARE's random drop and rescale (Yu et al., arXiv:2311.03099, Eq. 1-2) applied to each
task vector, then TIES-Merging (Yadav et al., arXiv:2306.01708, Alg. 1) on the result:
``theta = theta_0 + scaling * TIES(DARE(tau_1), ..., DARE(tau_T))``.

Follows FusionBench ``fusion_bench/method/dare/ties_merging.py`` (``DareTiesMerging``): the dropped
task vectors go through the *full* official TIES -- magnitude trim to ``ties_density`` over the
whole flattened vector (``threshold: 20`` = 0.2), sign election with the model-wide majority
for zero sums, disjoint ``merge_func``. ``scope="tensor"`` runs the TIES part per tensor;
``ties_density=1.0`` skips the trim, which is mergekit's ``dare_ties`` (drop, then sign consensus)
with ``merge_func="mean"`` standing in for its normalised sum.

Defaults from FusionBench ``config/method/dare/ties_merging.yaml``: ``density=0.5`` (its
``sparsity_ratio: 0.5``), ``rescale=True``, ``scaling=0.5``, ``ties_density=0.2``, ``merge_func="sum"``.
Masks are reproducible per ``seed`` as in :mod:`mergelab.methods.dare`; the statistics passes redraw
the same masks.
"""

from __future__ import annotations

from typing import Any

import torch

from mergelab.methods import ties as ties_module
from mergelab.methods.dare import check_dare, drop_and_rescale
from mergelab.methods.registry import Streaming, TensorCtx, register
from mergelab.ops.majority import MajorityVote
from mergelab.ops.thresholds import ModelThresholds, ThresholdPasses


def _ties_hparams(hp: dict[str, Any]) -> dict[str, Any]:
    return {"density": hp["ties_density"], "scaling": hp["scaling"], "merge_func": hp["merge_func"],
            "scope": hp["scope"], "threshold": "official"}


class DareTiesStats:
    """TIES' global thresholds, observed on the DARE-dropped task vectors only.

    Composed, not inherited: it offers no ``observe_raw`` (the compiled observation of the *stored*
    values, which cannot apply the drop), so every observation goes through :meth:`observe` and the drop."""

    def __init__(self, hp: dict[str, Any], n_models: int):
        self.thresholds = ThresholdPasses(hp["ties_density"], "official", n_models)
        self.hp = hp

    thread_safe = ThresholdPasses.thread_safe

    @property
    def n_passes(self) -> int:  # the thresholds', as it changes pass by pass
        return self.thresholds.n_passes

    def passes_for(self, dtype: torch.dtype) -> int:
        return self.thresholds.passes_for(dtype)

    def observe(self, index: int, name: str, taus: torch.Tensor, base: torch.Tensor) -> None:
        dropped = drop_and_rescale(taus, TensorCtx(name, seed=self.hp["seed"]), self.hp["density"],
                                   self.hp["rescale"], "inverse")
        self.thresholds.observe(index, name, dropped, base)

    def end_pass(self, index: int) -> None:
        self.thresholds.end_pass(index)

    def result(self) -> ModelThresholds:
        return self.thresholds.result()


def _check(hp: dict[str, Any], n_models: int) -> None:
    check_dare(hp, n_models)
    if not 0.0 <= hp["ties_density"] <= 1.0:
        raise ValueError(f"ties_density must be in [0, 1], got {hp['ties_density']}")


def _stats(hp: dict[str, Any], n_models: int) -> DareTiesStats | None:
    return DareTiesStats(hp, n_models) if hp["scope"] == "global" else None


def _late(hp: dict[str, Any], stats: ModelThresholds | None) -> MajorityVote | None:
    return ties_module.majority_vote(_ties_hparams(hp), stats)


@register(
    "dare_ties",
    defaults={"density": 0.5, "scaling": 0.5, "rescale": True, "seed": 0, "merge_func": "sum",
              "ties_density": 0.2, "scope": "global"},
    choices={"merge_func": ("mean", "sum", "max"), "scope": ("global", "tensor")},
    summary="DARE drop + rescale, then TIES (trim, elect sign, disjoint merge)",
    source="Yu et al. ICML 2024 + Yadav et al. NeurIPS 2023; FusionBench dare/ties_merging.py; "
    "defaults from FusionBench config/method/dare/ties_merging.yaml",
    check=_check,
    streaming=Streaming(stats=_stats, late=_late),
    linear_in_scaling=True,
    randomized=True,
)
def dare_ties(
    taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, *,
    density: float, scaling: float, rescale: bool, seed: int, merge_func: str, ties_density: float, scope: str,
) -> torch.Tensor:
    dropped = drop_and_rescale(taus, ctx, density, rescale, "inverse")
    return ties_module.ties(dropped, base, ctx, density=ties_density, scaling=scaling, merge_func=merge_func,
                            scope=scope, threshold="official")
