"""Weight averaging ("model soups", Wortsman et al., ICML 2022, arXiv:2203.05482, uniform soup).

``theta = sum_t w_t theta_t / sum_t w_t``; with the base fixed this is ``theta_0 + sum_t w_t tau_t / sum_t w_t``.
``weights=None`` (default) is the uniform soup of the paper. Weights are normalised to sum to one,
as mergekit's ``linear`` method does by default (``normalize: true``); they must not sum to zero.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mergelab.methods.registry import Elementwise, TensorCtx, register


def _check(hp: dict[str, Any], n_models: int) -> None:
    weights = hp["weights"]
    if weights is None:
        return
    if not isinstance(weights, (list, tuple)) or len(weights) != n_models:
        raise ValueError(f"weights must be a list of {n_models} numbers (one per model), got {weights!r}")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights!r}")
    if abs(sum(weights)) < 1e-12:
        raise ValueError("weights sum to zero")


@register(
    "weight_average",
    defaults={"weights": None},
    summary="(weighted) average of the models: the uniform model soup",
    source="Wortsman et al. ICML 2022 (uniform soup); weight normalisation as mergekit linear",
    check=_check,
    elementwise=Elementwise(),
)
def weight_average(taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, *, weights: list[float] | None) -> torch.Tensor:
    if weights is None:
        return taus.mean(dim=0)
    w = torch.tensor(weights, dtype=taus.dtype, device=taus.device)
    w = w / w.sum()
    return (w.reshape(-1, *[1] * (taus.dim() - 1)) * taus).sum(dim=0)
