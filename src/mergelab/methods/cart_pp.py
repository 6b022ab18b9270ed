"""CART++ (Choi et al., CART, arXiv:2412.12153, Sec. 4.3 Eq. 6, Appendix Algorithms 1-2), the merge with given
coefficients; ``mergelab adapt`` learns them by AdaMerging's entropy minimisation (``mergelab.adapt``)::

    theta^l = theta_avg^l + sum_t lambda_t^l * SVD_k(theta_t^l - theta_avg^l)

Matrices, ``k`` and the SVD numerics are those of ``cart`` (``rank_ratio`` from ``preset`` unless given,
``paper``: 0.08; ``exclude``, ``svd_dtype``); other tensors carry their whole centred vector
``theta_t - theta_avg``, as the official ``_get_truncated_task_vectors`` (JH-GEECS/CART ``src/merging.py``)
keeps them, so equal coefficients give exactly ``cart``'s weight average there (the centred vectors sum to 0).

``coefficients``: a file from ``mergelab adapt`` or its content (its recorded ``rank_ratio``, ``exclude``,
``svd_dtype`` and ``granularity`` are used); without it every coefficient is ``init``, i.e. ``cart(scaling=init)``.

Defaults: ``init=0.3``. The paper says CART++ "adopted the settings from AdaMerging" (Appendix, "Searching the
Scaling Coefficient"), whose initial coefficient is 0.3 (official ``prior``); CART's own data-free
``scaling`` is 1.0 (paper, Implementation Details): ``init=1.0`` starts from plain CART instead. The official
CART repository has no CART++ code, so the optimisation follows AdaMerging's (:mod:`mergelab.adapt.optimise`).
"""

from __future__ import annotations

from typing import Any

import torch

from mergelab.methods.cart import PRESETS
from mergelab.methods.cart import resolve as cart_resolve
from mergelab.methods.registry import Resolution, TensorCtx, WholeTensors, register
from mergelab.ops import coefficients as coef
from mergelab.ops.adaptive import cart_components, combine
from mergelab.ops.spectral import SVD_DTYPES, check_hparams

LEARNED = ("granularity", "rank_ratio", "exclude", "svd_dtype")


def _check(hp: dict[str, Any], n_models: int) -> None:
    check_hparams(hp)
    ratio = hp["rank_ratio"]
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0):
        raise ValueError(f"rank_ratio must be a number in [0, 1], got {ratio!r}")
    coef.check_file(hp, "cart_pp", n_models)


def _fill(hp: dict[str, Any]) -> dict[str, Any]:
    hp = coef.fill_from_file(hp, "cart_pp", LEARNED)
    return {**hp, "rank_ratio": cart_resolve(hp["preset"], hp["rank_ratio"], None)[0]}


@register(
    "cart_pp",
    defaults={"coefficients": None, "init": 0.3, "granularity": "layer", "rank_ratio": None, "preset": "paper",
              "exclude": [], "svd_dtype": "float64"},
    choices={"granularity": coef.GRANULARITIES, "preset": tuple(PRESETS), "svd_dtype": tuple(SVD_DTYPES)},
    summary="CART++: weight average + learned task-/layer-wise coefficients times rank-k centred task vectors",
    source="Choi et al. arXiv:2412.12153 Sec. 4.3 Eq. 6, Alg. 1-2; rank_ratio from cart's preset (paper 0.08); "
    "init 0.3 (AdaMerging's prior, which the paper says CART++ adopts); non-matrix tensors keep their whole centred "
    "vector (official JH-GEECS/CART _get_truncated_task_vectors)",
    check=_check,
    resolution=Resolution(presets={k: {"rank_ratio": v["rank_ratio"]} for k, v in PRESETS.items()}, fill_presets=_fill),
    whole_tensors=WholeTensors(parallel=True),  # LAPACK-bound
)
def cart_pp(taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, *, coefficients: Any, init: float,
            granularity: str, rank_ratio: float | None, preset: str, exclude: list[str], svd_dtype: str) -> torch.Tensor:
    table = None if coefficients is None else coef.load(coefficients)
    ratio = cart_resolve(preset, rank_ratio, None)[0]
    anchor, deltas = cart_components(ctx.name, taus, ratio, exclude, svd_dtype)
    return combine(anchor, deltas, coef.row(table, ctx.name, granularity, taus.shape[0], init))
