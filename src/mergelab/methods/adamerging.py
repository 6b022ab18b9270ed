"""AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024,
arXiv:2310.02575), the merge with given coefficients; ``mergelab adapt`` learns them (``mergelab.adapt``).

Eq. (3) task-wise / Eq. (4) layer-wise::

    theta = theta_0 + sum_t lambda_t^l * tau_t          tau_t = theta_t - theta_0, l the tensor's group

``coefficients``: a file written by ``mergelab adapt`` (``adapt_coefficients.json`` in the adapted model's
folder) or its content as a mapping; its recorded ``granularity`` is used. Without it every coefficient is
``init`` (= ``task_arithmetic(scaling=init)``), the adaptation's starting point.

Defaults: ``init=0.3`` (official ``prior = 0.3`` in ``src/main_{task,layer}_wise_adamerging.py``,
FusionBench ``config/method/adamerging/clip.yaml`` ``init_values: 0.3``); ``granularity="layer"``: one
coefficient per parameter tensor as the official code (see :mod:`mergelab.ops.coefficients`). The
optimisation's defaults are documented in :mod:`mergelab.adapt.optimise`.
"""

from __future__ import annotations

from typing import Any

import torch

from mergelab.methods.registry import Resolution, TensorCtx, register
from mergelab.ops import coefficients as coef
from mergelab.ops.adaptive import combine, task_vectors

LEARNED = ("granularity",)


def _check(hp: dict[str, Any], n_models: int) -> None:
    coef.check_file(hp, "adamerging", n_models)


@register(
    "adamerging",
    defaults={"coefficients": None, "init": 0.3, "granularity": "layer"},
    choices={"granularity": coef.GRANULARITIES},
    summary="base + sum of task vectors weighted by learned task-/layer-wise coefficients (mergelab adapt)",
    source="Yang et al. ICLR 2024 (AdaMerging) Eq. 3-4; official EnnengYang/AdaMerging main_*_adamerging.py; "
    "init 0.3 (official prior, FusionBench init_values); granularity layer = one per parameter tensor (official)",
    check=_check,
    resolution=Resolution(fill_presets=lambda hp: coef.fill_from_file(hp, "adamerging", LEARNED)),
)
def adamerging(taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, *, coefficients: Any, init: float,
               granularity: str) -> torch.Tensor:
    table = None if coefficients is None else coef.load(coefficients)
    anchor, deltas = task_vectors(taus)
    return combine(anchor, deltas, coef.row(table, ctx.name, granularity, taus.shape[0], init))
