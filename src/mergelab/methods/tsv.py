"""TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025, arXiv:2412.00081): Task Singular Vectors Merge.

For each matrix with task matrices ``tau_t`` (m x n), ``r = min(m, n)``, ``T`` tasks::

    tau_t = U_t diag(s_t) V_t^T,  k = floor(r / T)                      # each task keeps k triplets
    U = [U_1[:, :k] .. U_T[:, :k]]  (m, Tk),   V = [V_1[:, :k] .. V_T[:, :k]]  (n, Tk)
    S = diag(s_1[:k] .. s_T[:k])
    U_perp = P Q^T  where  U = P Sigma Q^T        (polar factor / orthogonal Procrustes; same for V)
    delta  = scaling * U_perp S V_perp^T

Every other tensor (and each 2-D tensor matched by ``exclude``): ``delta = scaling * mean_t tau_t``.

Follows the official code, AntoAndGar/task_singular_vectors (commit a6c9718)
``src/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction`` (method ``TSVM``), which FusionBench
ports unchanged (``fusion_bench/method/task_singular_vector/utils/TSVM_utils.py``):

* ``k = int(r * (1 / T))``, equal to ``r // T`` (checked for r < 5000, T < 40). A matrix with
  ``r < T`` therefore gets a zero delta, as in the official code; name it in ``exclude`` to
  average it instead.
* The official code orthogonalises U padded with ``r - Tk`` zero columns (and V with zero rows).
  We take the polar factor of the ``Tk`` kept columns only, dropping triplets whose singular value
  is numerically zero, and use the partial isometry where the columns are linearly dependent
  (``ops.spectral.significant``, ``polar``). On generic inputs this is the official product; on
  exactly rank-deficient ones (a task vector that is zero on this tensor, duplicated models) the
  official output depends on the SVD routine's arbitrary basis for zero singular values, ours
  does not: e.g. T copies of one task give ``SVD_k(tau)``, and a zero task vector is ignored.
* ``low_rank="auto"`` (default) is ours, a deviation from the official code: triplets whose
  singular value is numerically zero, ``s <= rank_tol * max(s)`` over every task's kept ones
  (``rank_tol=1e-5``), are left out too, and so are directions of ``U`` (``V``) with singular values
  ``<= rank_tol`` times its largest (near-duplicate models). LoRA-derived task vectors have such
  triplets (their other singular values are rounding noise): there the official definition is
  ill-posed (4 rank-2 tasks: a 1e-7 perturbation moved its output by 116 % of the task vectors'
  largest entry, float32 vs float64 SVDs likewise), ours moves by ~3e-7. Where nothing lies below
  the threshold (full-rank inputs) the result is bit-identical to ``low_rank="official"``, the
  definition above. See ``ops.spectral``, "Low-rank inputs"; the merge reports the matrices concerned.
* The official eigendecomposition variant (``TSVM_2``, ``U (U^T U)^(-1/2)``) is not offered: it
  forms ``U^T U``, which squares the condition number.
* Non-matrices: the running mean of the official code; ``scaling`` multiplies them too, as the
  official ``scaling_coef`` does (it scales the whole merged task vector).

Defaults: ``scaling=1.0``, FusionBench ``config/method/task_singular_vector/TaskSingularVectorMerging.yaml``
(``alpha: 1``). The official repo instead picks alpha on validation data from
``linspace(0, 3, 31)[1:]`` (src/eval/eval.py, ``evaluate_task_vector``); set ``scaling`` if you
have validation data. ``exclude=[]``; ``OFFICIAL_EXCLUDE["tsv"]`` (``["*text_projection*"]``,
see ``ops.spectral``) reproduces the official repo's rule; FusionBench excludes nothing by default.
Task order does not matter: permuting tasks permutes the blocks of U, S and V alike.
``svd_dtype="float64"`` is ours (the official code runs in float32): see ``ops.spectral`` for why and
the measured differences; ``svd_dtype="float32"`` gives the official numerics.
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
    numerical,
    polar_and_spectrum,
)
from mergelab.ops.svd import fast_svd, matmul


def tsv_matrix(
    taus: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    tol: float = 0.0,
    rank_tol: float = 0.0,
    notes: dict[str, Any] | None = None,
    detect: float = RANK_TOL,
) -> torch.Tensor:
    """TSV-M merge of stacked task matrices ``(T, m, n)``, unscaled, computed in ``dtype``; every
    SVD by ``ops.svd.fast_svd`` with error tolerance ``tol`` (0: all exact). Triplets with
    ``s <= rank_tol * max(s)`` (over every task's kept ones) and directions of ``U`` (``V``) with
    singular values ``<= rank_tol`` times its largest (near-duplicate tasks) are left out
    (``ops.spectral.numerical``; 0: exact zeros only). Their count goes into ``notes``
    (``ops.spectral.note_rank``), counted at ``s <= detect * max(s)`` whatever ``rank_tol``."""
    T, m, n = taus.shape
    k = min(m, n) // T
    if k == 0:
        return torch.zeros_like(taus[0])
    us, ss, vhs = [], [], []
    for tau in taus:  # one SVD at a time: memory stays ~ one matrix, as in the official loop
        # only the top k triplets are used; the Gram path's error in them (eps lam_1 / lam_k) is
        # weighted by s_k, so a small gap at k costs no more than in the exact SVD (no gap check)
        U, S, Vh = fast_svd(tau.to(dtype), k, tol)  # (m, k) (k,) (k, n)
        us.append(U)
        ss.append(S)
        vhs.append(Vh)
    u, s, vh = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)  # (m, Tk) (Tk,) (Tk, n)
    noise = noise_count(s, detect)
    keep = numerical(s, (m, n), rank_tol)  # drop triplets of (numerically) zero singular values: arbitrary vectors
    if not bool(keep.any()):
        note_rank(notes, noise, T * k)
        return torch.zeros_like(taus[0])
    u, s, vh = u[:, keep], s[keep], vh[keep]
    pu, su = polar_and_spectrum(u, tol, rank_tol)
    pv, sv = polar_and_spectrum(vh, tol, rank_tol)
    note_rank(notes, min(T * k, noise + max(noise_count(su, detect), noise_count(sv, detect))), T * k)
    return matmul(pu * s, pv).to(taus.dtype)


def _check(hp: dict[str, Any], n_models: int) -> None:
    check_hparams(hp)


@register(
    "tsv",
    defaults={"scaling": 1.0, "exclude": [], "svd_dtype": "float64", "low_rank": "auto", "rank_tol": RANK_TOL},
    choices={"svd_dtype": tuple(SVD_DTYPES), "low_rank": LOW_RANK},
    summary="TSV-M: top r/T singular triplets per task, orthogonalised U and V (polar factors), scaled",
    source="Gargiulo et al. CVPR 2025 (arXiv:2412.00081); official AntoAndGar/task_singular_vectors "
    "src/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction; scaling 1.0 from FusionBench "
    "config/method/task_singular_vector/TaskSingularVectorMerging.yaml (official: validation search over 0.1..3.0)",
    check=_check,
    linear_in_scaling=True,
    whole_tensors=WholeTensors(parallel=True),  # LAPACK-bound: tensors merged at once, one per core (engine.stream)
    compat=LOW_RANK_COMPAT,  # runs stored before the low_rank option keep their identity
)
def tsv(
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
    return tsv_matrix(taus, *numerics, dropped_below(low_rank, rank_tol), ctx.notes, rank_tol) * scaling
