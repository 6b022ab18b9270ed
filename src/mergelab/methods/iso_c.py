"""Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025, arXiv:2502.04959): Isotropic merging in the Common subspace.

For each matrix: sum the task matrices (task arithmetic), take its SVD and replace every singular
value by their mean (a flat, "isotropic" spectrum)::

    sum_t tau_t = U diag(s) V^T,    delta = scaling * mean(s) * U V^T

Every other tensor (and each 2-D tensor matched by ``exclude``): ``delta = scaling * mean_t tau_t``.

Follows the official code, danielm1405/iso-merging (commit d34010a) ``src/utils/iso.py::iso_c``,
which FusionBench ports (``fusion_bench/method/isotropic_merging/iso_utils.py::iso_c``). The mean
runs over all ``min(m, n)`` singular values, as there. Departure: when the sum is exactly
rank-deficient (rank rho < min(m, n), e.g. duplicated low-rank task vectors), the official
``U V^T`` also spans the sum's null directions, an arbitrary basis picked by the SVD routine, each
given the mean singular value; we keep only the rho directions with non-zero singular values
(``ops.spectral.significant``), so the output has rank rho, all its non-zero singular values equal
``mean(s)``. On full-rank sums (generic inputs) the two agree.

Departure on numerically rank-deficient sums, ``low_rank="auto"`` (default; ours): directions with
``s <= rank_tol * s_1`` (``rank_tol=1e-5``) are left out as well: ``delta = mean(s) U_rho V_rho^T``
over the ``rho`` directions above the threshold -- the official output projected on the sum's
numerical range, its only well-defined part. LoRA-derived task vectors make the sum numerically
rank-deficient (rank <= sum of the LoRA ranks, the rest rounding noise), and the official
definition gives each noise direction the mean singular value: with 4 rank-2 tasks a 1e-7
perturbation moved its output by 63 % of the task vectors' largest entry, float32 vs float64 SVDs
by 98 %; ours by ~3e-7. Where nothing lies below the threshold (full-rank sums) the result is
bit-identical to ``low_rank="official"``. See ``ops.spectral``, "Low-rank inputs".

Defaults: ``scaling=1.0``, FusionBench ``config/method/isotropic_merging/iso_c.yaml``
(``scaling_factor: 1.0``). The official repo fixes no value: it picks alpha on validation data from
``linspace(0, 3, 31)[1:]`` (src/eval/eval.py, ``evaluate_task_vector``, branch
``iso_c/iso_cts/TSVM``). FusionBench's docs (docs/algorithms/isotropic_merging.md) and its
singular-value-calibration configs run Iso-C with ``scaling_factor=1.5`` for CLIP ViT-B/32 and
ViT-L/14 on 8 tasks; pass ``scaling=1.5`` to reproduce those runs. ``exclude=[]``;
``OFFICIAL_EXCLUDE["iso_c"]`` (``["*text_projection*"]``, see ``ops.spectral``) reproduces the official
repo; FusionBench excludes nothing by default. Task order does not matter (only the sum enters).
``svd_dtype="float64"`` is ours (the official code runs in float32): a flat spectrum gives the
sum's smallest singular directions full weight, and float32 gets those least accurately (see
``ops.spectral``); ``svd_dtype="float32"`` gives the official numerics.
"""

from __future__ import annotations

from typing import Any

import torch

from mergelab.methods.registry import TensorCtx, WholeTensors, register
from mergelab.ops.spectral import (
    LOW_RANK,
    LOW_RANK_COMPAT,
    RANK_TOL,
    SVD_DTYPES,
    check_hparams,
    dropped_below,
    matrix_numerics,
    noise_count,
    note_rank,
    polar_and_spectrum,
)


def iso_c_matrix(
    taus: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    tol: float = 0.0,
    rank_tol: float = 0.0,
    notes: dict[str, Any] | None = None,
    detect: float = RANK_TOL,
) -> torch.Tensor:
    """Iso-C merge of stacked task matrices ``(T, m, n)``, unscaled, computed in ``dtype``: ``mean(s) U V^T``
    is the mean singular value times the sum's polar factor (``ops.spectral.polar_and_spectrum``, error
    tolerance ``tol``, 0: exact SVD), over its numerically non-zero directions ``s > rank_tol * s_1``
    (those of zero singular values are arbitrary: dropped; ``rank_tol=0``: exact zeros only). How
    many are at most ``detect * s_1`` goes into ``notes`` (``ops.spectral.note_rank``)."""
    factor, s = polar_and_spectrum(taus.sum(dim=0).to(dtype), tol, rank_tol)
    note_rank(notes, noise_count(s, detect), s.numel())
    return (factor * s.mean()).to(taus.dtype)


def _check(hp: dict[str, Any], n_models: int) -> None:
    check_hparams(hp)


@register(
    "iso_c",
    defaults={"scaling": 1.0, "exclude": [], "svd_dtype": "float64", "low_rank": "auto", "rank_tol": RANK_TOL},
    choices={"svd_dtype": tuple(SVD_DTYPES), "low_rank": LOW_RANK},
    summary="Iso-C: SVD of the task-vector sum with its spectrum flattened to the mean singular value",
    source="Marczak et al. ICML 2025 (arXiv:2502.04959); official danielm1405/iso-merging src/utils/iso.py::iso_c; "
    "scaling 1.0 from FusionBench config/method/isotropic_merging/iso_c.yaml (official: validation search over 0.1..3.0)",
    check=_check,
    linear_in_scaling=True,
    whole_tensors=WholeTensors(parallel=True),  # LAPACK-bound: tensors merged at once, one per core (engine.stream)
    compat=LOW_RANK_COMPAT,  # runs stored before the low_rank option keep their identity
)
def iso_c(
    taus: torch.Tensor,
    base: torch.Tensor,
    ctx: TensorCtx,
    *,
    scaling: float,
    exclude: list[str],
    svd_dtype: str,
    low_rank: str = "auto",
    rank_tol: float = RANK_TOL,
) -> torch.Tensor:
    numerics = matrix_numerics(ctx.name, base.shape, exclude, svd_dtype, taus.dtype)
    if numerics is None:
        return taus.mean(dim=0) * scaling
    return iso_c_matrix(taus, *numerics, dropped_below(low_rank, rank_tol), ctx.notes, rank_tol) * scaling
