"""Iso-CTS (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025, arXiv:2502.04959): Isotropic merging in Common and
Task-Specific subspaces.

For each matrix (m x n, ``r = min(m, n)``, ``T`` tasks)::

    sum_t tau_t = U diag(s) V^T;  common subspace: the top c triplets (U_c, s_c, V_c)
    tau_t' = tau_t - U_c U_c^T tau_t = U_t diag(s_t) V_t^T    # task t with the common left subspace removed
    U_all = [U_1[:, :p] .. U_T[:, :p], U_c]    (m, r),  s_all and V_all likewise,  p = (r - c) / T
    delta = scaling * mean(s_all) * polar(U_all) polar(V_all^T)   # orthogonalise, flatten the spectrum

with ``c = int(r * common_space_fraction)``, then moved so that ``r - c`` splits evenly between the
tasks: ``c = r - round((r - c) / T) * T`` (Python's ``round``, half to even). Every other tensor
(and each 2-D tensor matched by ``exclude``): ``delta = scaling * mean_t tau_t``.

Follows the official code, danielm1405/iso-merging (commit d34010a) ``src/utils/iso.py::iso_cts``,
ported unchanged by FusionBench (``fusion_bench/method/isotropic_merging/iso_utils.py::iso_cts``).
Departure: where that rounding would give the task subspaces more than ``r`` dimensions (a small
``common_space_fraction`` with ``r`` not much larger than ``T``, e.g. r=7, T=2, fraction 0), the
official code slices with a negative ``c`` and breaks; we round down instead (one ``T`` fewer).
Departure on exactly rank-deficient input, as in ``tsv``: triplets with numerically zero singular
values (their vectors are the SVD routine's arbitrary choice) are dropped, from the common block
used for the projection as well as before orthogonalising, and linearly dependent blocks (duplicated models) get the partial-isometry polar factor
(``ops.spectral.significant``, ``polar``); the mean still runs over all ``r`` slots. Generic inputs
are unaffected. With ``low_rank="auto"`` (default; ours, not in the official code) "zero" means
numerically zero, ``s <= rank_tol * s_1`` (``rank_tol=1e-5``, ``s_1`` the largest of all ``r`` slots),
and near-dependent directions of the stacked bases (``<= rank_tol`` times the largest) are dropped
too: with LoRA-derived task vectors the sum's and the task residuals' other singular values are
rounding noise, which the official definition orthogonalises and gives the mean singular value
(4 rank-2 tasks: a 1e-7 perturbation moved its output by 61 % of the task vectors' largest entry,
float32 vs float64 SVDs by 111 %; ours ~3e-7). Full-rank inputs: bit-identical to
``low_rank="official"``. See ``ops.spectral``, "Low-rank inputs".
With ``common_space_fraction=1`` Iso-CTS is Iso-C. Task order does not matter: permuting tasks
permutes the blocks of ``U_all`` and ``V_all`` alike, and the flat spectrum commutes with that.

Defaults: ``common_space_fraction=0.8`` (official README command and config/method/iso_cts.yaml;
FusionBench config/method/isotropic_merging/iso_cts.yaml). ``scaling=1.0`` (FusionBench
iso_cts.yaml, ``scaling_factor: 1.0``); the official repo picks alpha on validation data from
``linspace(0, 3, 31)[1:]`` (src/eval/eval.py), and FusionBench's docs run Iso-CTS on CLIP ViT-B/32
(8 tasks) with ``scaling_factor=1.5``. ``exclude=[]``; ``OFFICIAL_EXCLUDE["iso_cts"]``
(``["*text_projection*"]``, see ``ops.spectral``) reproduces the official repo. ``svd_dtype="float64"``
is ours (the official code runs in float32; float32 changed the output by 8 % on a fast-decaying
synthetic spectrum, see ``ops.spectral``); ``svd_dtype="float32"`` gives the official numerics.
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
    flat_spectrum,
    matrix_numerics,
    noise_count,
    note_rank,
    numerical,
    polar_and_spectrum,
)
from mergelab.ops.svd import fast_svd, matmul


def subspace_sizes(r: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """``(common, per_task)`` dimensions with ``common + n_tasks * per_task == r`` (official rounding)."""
    common = int(r * fraction)
    task_total = round((r - common) / n_tasks) * n_tasks
    if task_total > r:  # official code: negative common size (see module docstring)
        task_total -= n_tasks
    return r - task_total, task_total // n_tasks


def iso_cts_matrix(
    taus: torch.Tensor,
    common_space_fraction: float,
    dtype: torch.dtype = torch.float64,
    tol: float = 0.0,
    rank_tol: float = 0.0,
    notes: dict[str, Any] | None = None,
    detect: float = RANK_TOL,
) -> torch.Tensor:
    """Iso-CTS merge of stacked task matrices ``(T, m, n)``, unscaled, computed in ``dtype``; every
    SVD by ``ops.svd.fast_svd`` with error tolerance ``tol`` (0: all exact). Directions with
    ``s <= rank_tol * s_1`` (``s_1``: the largest of the sum's and the task blocks' singular values)
    are left out -- of the common block used for the projection, and of the slots before
    orthogonalising -- as are near-dependent directions of the stacked bases (``ops.spectral.numerical``;
    ``rank_tol=0``: exact zeros only). How many are at most ``detect * s_1`` goes into ``notes``."""
    T, m, n = taus.shape
    common, per_task = subspace_sizes(min(m, n), T, common_space_fraction)
    # the common subspace projects the tasks unweighted: its boundary (gap at c) must be resolved too
    U, S, Vh = fast_svd(taus.sum(dim=0).to(dtype), common, tol, gap=per_task > 0)  # (m, c) (c,) (c, n)
    us, ss, vhs = [], [], []
    if per_task > 0:
        U_c = U[:, numerical(S, (m, n), rank_tol)]  # (m, <= c): no arbitrary null directions
        for tau in taus:
            tau = tau.to(dtype)
            # task t outside the common left subspace; its top triplets, as in tsv
            U_t, S_t, Vh_t = fast_svd(tau - U_c @ (U_c.mT @ tau), per_task, tol)
            us.append(U_t)
            ss.append(S_t)
            vhs.append(Vh_t)
    u = torch.cat([*us, U], dim=1)  # (m, r): task blocks, then the common block (official order)
    s = torch.cat([*ss, S])  # (r,)
    vh = torch.cat([*vhs, Vh], dim=0)  # (r, n)
    flat = flat_spectrum(s)  # the mean over all r slots, as in the official code
    noise = noise_count(s, detect)
    keep = numerical(s, (m, n), rank_tol)  # triplets of (numerically) zero singular values have arbitrary vectors: dropped
    if not bool(keep.any()):
        note_rank(notes, noise, s.numel())
        return torch.zeros_like(taus[0])
    pu, su = polar_and_spectrum(u[:, keep], tol, rank_tol)
    pv, sv = polar_and_spectrum(vh[keep], tol, rank_tol)
    note_rank(notes, min(s.numel(), noise + max(noise_count(su, detect), noise_count(sv, detect))), s.numel())
    return matmul(pu * flat[keep], pv).to(taus.dtype)


def _check(hp: dict[str, Any], n_models: int) -> None:
    check_hparams(hp)
    if not 0.0 <= hp["common_space_fraction"] <= 1.0:
        raise ValueError(f"common_space_fraction must be in [0, 1], got {hp['common_space_fraction']}")


@register(
    "iso_cts",
    defaults={
        "scaling": 1.0, "common_space_fraction": 0.8, "exclude": [], "svd_dtype": "float64",
        "low_rank": "auto", "rank_tol": RANK_TOL,
    },
    choices={"svd_dtype": tuple(SVD_DTYPES), "low_rank": LOW_RANK},
    summary="Iso-CTS: common subspace of the sum plus per-task subspaces, orthogonalised, flat spectrum",
    source="Marczak et al. ICML 2025 (arXiv:2502.04959); official danielm1405/iso-merging src/utils/iso.py::iso_cts; "
    "common_space_fraction 0.8 (official README/config), scaling 1.0 (FusionBench iso_cts.yaml; "
    "official: validation search over 0.1..3.0)",
    check=_check,
    linear_in_scaling=True,
    whole_tensors=WholeTensors(parallel=True),  # LAPACK-bound: tensors merged at once, one per core (engine.stream)
    compat=LOW_RANK_COMPAT,  # runs stored before the low_rank option keep their identity
)
def iso_cts(
    taus: torch.Tensor,
    base: torch.Tensor,
    ctx: TensorCtx,
    *,
    scaling: float,
    common_space_fraction: float,
    exclude: list[str],
    svd_dtype: str,
    low_rank: str = "auto",
    rank_tol: float = RANK_TOL,
) -> torch.Tensor:
    numerics = matrix_numerics(ctx.name, base.shape, exclude, svd_dtype, taus.dtype)
    if numerics is None:
        return taus.mean(dim=0) * scaling
    rank = dropped_below(low_rank, rank_tol)
    return iso_cts_matrix(taus, common_space_fraction, *numerics, rank, ctx.notes, rank_tol) * scaling
