"""CART (Choi et al., "Revisiting Weight Averaging for Model Merging", arXiv:2412.12153): Centered
Arithmetic with Rank-reduced Task vectors, Eq. (4) and Algorithm 1::

    theta = theta_avg + scaling * sum_t SVD_k(theta_t - theta_avg)        per matrix, k from rank_ratio

With ``tau_t = theta_t - theta_0`` this is ``delta = mean(taus) + scaling * sum_t SVD_k(tau_t - mean(taus))``.
Every other tensor (and each 2-D tensor matched by ``exclude``) is the plain weight average,
``delta = mean(taus)`` (paper, "Implementation Details"; official code: its centred vectors sum to 0).

Rank, as the official code (JH-GEECS/CART, commit 964cfd7, ``src/merging.py``,
``StaticMergeModule._get_truncated_task_vectors``): ``k = max(1, int(rank_ratio * min(m, n)))``,
``rank_ratio=0`` keeps nothing (weight average), ``rank_ratio=1`` keeps everything (again the
weight average, as the centred task vectors sum to zero). With two tasks the centred vectors are
``c`` and ``-c``, so CART is the weight average for every ``rank_ratio`` and ``scaling``.

Defaults, chosen with ``preset`` (``rank_ratio``/``scaling`` given explicitly override the preset):

=============== ========== ======= ============================================================
preset          rank_ratio scaling source
=============== ========== ======= ============================================================
``paper``       0.08       1.0     paper, "Implementation Details" (ViT-B/32, ViT-L/14, 8 tasks)
``official_8``  0.12       2.0     official configs/CART/ViT-b-32_8_CART.yaml (``initial_rank_ratio``, ``prior``)
``official_14`` 0.16       1.5     official configs/CART/ViT-b-32_14_CART.yaml
``official_20`` 0.32       1.9     official configs/CART/ViT-b-32_20_CART.yaml
=============== ========== ======= ============================================================

The paper reports Table 1 (ViT-B/32, 8 tasks, 83.0) at 8 % rank (Fig. 4 caption) and names
lambda = 1.0 in "Implementation Details", while its Appendix A describes a grid search of lambda
over {0.05, 0.1, 0.2, ..., 1.0}. The official repo ships only the three ViT-B/32 configs above;
its README reports 84.7 / 79.5 / 76.3 for 8 / 14 / 20 tasks. Which 2-D tensors
are matrices: the official code decomposes only names containing ``attn`` or ``mlp`` and neither
``ln`` nor ``bias``, and averages e.g. the positional embedding and the visual projection;
``exclude=OFFICIAL_EXCLUDE["cart"]`` (see ``ops.spectral``) reproduces that. Task order does not matter.
``svd_dtype="float64"`` is ours, for uniformity with the other spectral methods (the official code
runs in float32; CART keeps true singular values, so the two differed by < 1e-5 in our tests).

``center=False`` is the paper's comparison curve (Sec. 4.1, Fig. 1-2, blue: "rank reduction on the
original task vectors", collapsing to the pre-trained model at rank zero), as the official
``_get_truncated_task_vectors`` computes it without an origin move::

    delta = scaling * sum_t SVD_k(tau_t)          per matrix; other tensors scaling * sum_t tau_t

(other tensors are zeroed too when ``rank_ratio=0``, as in the official code). It is task arithmetic
on rank-reduced task vectors, so pick a task-arithmetic ``scaling`` (e.g. 0.3) with it.

``route=t`` is not a merge but the paper's direct-routing analysis (Sec. 4.1, Eq. 5, Fig. 3): the model for task
``t`` alone, ``R_k(t) = anchor + SVD_k(theta_t - anchor)`` per matrix, with ``anchor = theta_avg``
(``center=True``) or ``theta_0`` (``center=False``) and no ``scaling``; the other tensors are task ``t``'s own
(Eq. 5 is stated for the decomposed layers). At ``rank_ratio=1`` it is expert ``t`` itself. Experiments of
kind ``routing`` score each task with its own routed model.

``keep="bottom"`` is the paper's reverse-ordered rank reduction (Sec. 4.1, Fig. 2): ``SVD_k`` keeps the
``k`` *smallest* singular triplets of each (centred or not) task matrix instead of the largest, exact SVD
(``ops.spectral.smallest_components``). At ``rank_ratio=1`` both orders keep everything.
"""

from __future__ import annotations

from typing import Any

import torch

from mergelab.methods.registry import Resolution, TensorCtx, WholeTensors, register
from mergelab.ops.spectral import SVD_DTYPES, check_hparams, kept_rank, low_rank, matrix_numerics, smallest_components

PRESETS: dict[str, dict[str, float]] = {
    "paper": {"rank_ratio": 0.08, "scaling": 1.0},
    "official_8": {"rank_ratio": 0.12, "scaling": 2.0},
    "official_14": {"rank_ratio": 0.16, "scaling": 1.5},
    "official_20": {"rank_ratio": 0.32, "scaling": 1.9},
}


def cart_matrix(
    taus: torch.Tensor,
    rank_ratio: float,
    scaling: float,
    dtype: torch.dtype = torch.float64,
    tol: float = 0.0,
    center: bool = True,
    keep: str = "top",
) -> torch.Tensor:
    """CART delta of stacked task matrices ``(T, m, n)``: mean + scaling * sum of rank-k centred
    vectors (``center=False``: scaling * sum of rank-k task vectors); the SVDs (``ops.svd.fast_svd``
    with error tolerance ``tol``, 0: exact) and their sum in ``dtype``. ``keep="bottom"``: the k
    smallest singular triplets instead (exact SVD)."""
    origin = taus.mean(dim=0) if center else torch.zeros_like(taus[0])
    k = kept_rank(min(taus.shape[1:]), rank_ratio)
    if k == 0:
        return origin
    centre = origin.to(dtype)
    reduced = torch.zeros_like(centre)
    for tau in taus:  # one SVD at a time: memory stays ~ one matrix
        reduced += _rank_k(tau.to(dtype) - centre, k, tol, keep)
    return origin + scaling * reduced.to(taus.dtype)


def _rank_k(x: torch.Tensor, k: int, tol: float, keep: str) -> torch.Tensor:
    """``SVD_k(x)``: its top ``k`` singular triplets (weighted by s: no gap check needed), or with
    ``keep="bottom"`` its ``k`` smallest (exact SVD)."""
    return low_rank(x, k, tol) if keep == "top" else smallest_components(x, k)


def routed_matrix(taus: torch.Tensor, route: int, rank_ratio: float, dtype: torch.dtype = torch.float64,
                  tol: float = 0.0, center: bool = True, keep: str = "top") -> torch.Tensor:
    """Eq. (5): ``anchor + SVD_k(tau_route - anchor)`` of stacked task matrices ``(T, m, n)``, the anchor the
    mean task vector (``center``) or zero; ``keep="bottom"``: the k smallest triplets."""
    origin = taus.mean(dim=0) if center else torch.zeros_like(taus[0])
    k = kept_rank(min(taus.shape[1:]), rank_ratio)
    return origin + _rank_k(taus[route].to(dtype) - origin.to(dtype), k, tol, keep).to(taus.dtype)


def resolve(preset: str, rank_ratio: float | None, scaling: float | None) -> tuple[float, float]:
    """The preset's values, overridden by those given explicitly."""
    chosen = PRESETS[preset]
    return (
        float(chosen["rank_ratio"] if rank_ratio is None else rank_ratio),
        float(chosen["scaling"] if scaling is None else scaling),
    )


def _fill_presets(hp: dict[str, Any]) -> dict[str, Any]:
    """``rank_ratio`` / ``scaling`` left ``None`` take the preset's values (the registry's ``fill_presets``)."""
    ratio, scale = resolve(hp["preset"], hp["rank_ratio"], hp["scaling"])
    return {**hp, "rank_ratio": ratio, "scaling": scale}


def _check(hp: dict[str, Any], n_models: int) -> None:
    check_hparams(hp)
    ratio = hp["rank_ratio"]
    if ratio is not None and (
        isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0
    ):
        raise ValueError(f"rank_ratio must be a number in [0, 1], got {ratio!r}")
    route = hp["route"]
    if route is not None and (isinstance(route, bool) or not isinstance(route, int) or not 0 <= route < n_models):
        raise ValueError(f"route must be the index of one of the {n_models} models, got {route!r}")


@register(
    "cart",
    defaults={
        "rank_ratio": None,
        "scaling": None,
        "preset": "paper",
        "exclude": [],
        "svd_dtype": "float64",
        "center": True,
        "keep": "top",
        "route": None,
    },
    choices={"preset": tuple(PRESETS), "svd_dtype": tuple(SVD_DTYPES), "keep": ("top", "bottom")},
    resolution=Resolution(presets=PRESETS, fill_presets=_fill_presets),
    summary="CART: weight average + scaling * sum of rank-k SVDs of the task vectors centred on the average",
    source="Choi et al. arXiv:2412.12153 Eq. (4); official JH-GEECS/CART src/merging.py; rank_ratio/scaling "
    "None = from preset: paper 0.08/1.0 (Implementation Details), official_8 0.12/2.0, official_14 0.16/1.5, "
    "official_20 0.32/1.9 (official configs/CART/*.yaml); center=False: the paper's uncentred comparison "
    "(Sec. 4.1, Fig. 1 blue); keep=bottom: the reverse-ordered rank reduction (Sec. 4.1, Fig. 2); route=t: the "
    "direct routing of Eq. (5), Fig. 3",
    check=_check,
    whole_tensors=WholeTensors(parallel=True),  # LAPACK-bound: tensors merged at once, one per core (engine.stream)
    compat={"keep": "top", "route": None},  # experiment runs from before these options keep their identity
)
def cart(
    taus: torch.Tensor,
    base: torch.Tensor,
    ctx: TensorCtx,
    *,
    rank_ratio: float | None,
    scaling: float | None,
    preset: str,
    exclude: list[str],
    svd_dtype: str,
    center: bool,
    keep: str,
    route: int | None,
) -> torch.Tensor:
    ratio, scale = resolve(preset, rank_ratio, scaling)  # a no-op after the registry's resolve; kept for direct calls
    numerics = matrix_numerics(ctx.name, base.shape, exclude, svd_dtype, taus.dtype)
    if route is not None:  # Eq. (5): task `route`'s own model, its matrices rank-reduced around the anchor
        return taus[route] if numerics is None else routed_matrix(taus, route, ratio, *numerics, center, keep)
    if numerics is None:
        if center:
            return taus.mean(dim=0)
        return taus.sum(dim=0) * (scale if ratio > 0.0 else 0.0)  # official: zeroed at rank 0
    return cart_matrix(taus, ratio, scale, *numerics, center, keep)
