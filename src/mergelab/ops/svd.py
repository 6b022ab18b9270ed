"""Singular value decompositions for the spectral methods: the exact one (:func:`svd`, LAPACK or
cuSOLVER) and a fast one (:func:`fast_svd`) checked against its own error estimate, which falls
back to the exact one when the estimate is not tight.

The fast path is the eigendecomposition of the Gram matrix on the smaller side, in float64: for a
tall ``x`` (m >= n), ``x^T x = W diag(lam) W^T`` gives ``V = W``, ``s = sqrt(lam)``, ``U = x V / s``
(wide: the transpose). One GEMM and one symmetric eigendecomposition of ``min(m, n)`` replace a
full SVD, and only the eigenpairs a method uses are computed: on this project's CPU (float64, one
thread) the top 97 of 768 pairs of a 3072 x 768 task matrix take 103 ms in all (Gram, eigenpairs,
``U``), its float32 SVD (the official codes' numerics) 275-290 ms (see :func:`gram_eigh`).

Why it is accurate enough, and when it is not. The computed eigenpairs are exact for a Gram matrix
perturbed by about ``eps64 * lam_1`` (backward stability of ``eigh``; forming ``x^T x`` from
float32 data adds the same order). Squaring the singular values therefore costs accuracy in the
small ones: a singular value ``s_i`` and the vectors paired with it carry a relative error of
about ``eps64 * lam_1 / lam_i``. :func:`error_estimate` computes that figure for the smallest
singular value a method uses (and, with ``gap=True``, for the gap below its last kept direction,
for methods that use a kept subspace unweighted); the fast result is used only if the estimate is
at most ``tol``. Exactly or nearly rank-deficient inputs (a zero task vector, duplicated models)
make the estimate huge and take the exact path, so ``ops.spectral.significant`` sees LAPACK's
singular values there. Measured errors were 3 to 100 times below the estimate (tests check it on
random structured matrices).

``tol`` comes from the dtype the method's result is cast to (:func:`tolerance`): a float32 result
accepts estimates up to a quarter of float32's rounding unit, so the fast and the exact paths round
to the same float32 tensor but for a few last-bit flips; a float64 result gets ``tol = 0``, the
exact path. The exact path is also the one for ``svd_dtype="float32"`` (the official numerics).
Methods that chain decompositions can be ill-conditioned themselves: the polar factor of a nearly
rank-deficient stack of singular vectors (TSV-M, Iso-CTS when tasks share directions) amplifies
float64 rounding of its input to ~1e-8 relative in the exact path as well; there the fast and the
exact results differ by that amount (tests bound the difference by the exact path's own response
to a rounding-size perturbation).

Device choice (:func:`solver`): the Gram path runs where the tensors are, CPU or CUDA (``eigh``
is cuSOLVER ``syevd`` there); the exact fallback uses :func:`svd_driver` (``gesvd`` on CUDA).
GPU timings of either remain to be measured in this project.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from mergelab.ops.lapack import eigh_top, single_threaded_blas
from mergelab.ops.lapack import svd as lapack_svd

EPS64 = torch.finfo(torch.float64).eps


def svd_driver(device: torch.device) -> str | None:
    """cuSOLVER driver for ``torch.linalg.svd``; ``None`` off CUDA (the argument is CUDA-only).

    On CUDA we ask for ``gesvd`` (QR iteration, the LAPACK algorithm): task matrices are close to
    low rank with clusters of tiny singular values, where the Jacobi solver (``gesvdj``, tried
    first by PyTorch's default; orthogonality errors of ~5e-3 reported on 768 x 3072) may stop
    before convergence and ``gesvda`` is documented as inaccurate for rank-deficient input.
    ``gesvd`` is the slowest of the three; accuracy first, and the fast path (:func:`fast_svd`)
    avoids it whenever its error estimate allows. Not measured on a GPU in this project yet.
    """
    return "gesvd" if device.type == "cuda" else None


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact reduced SVD of ``(..., m, n)`` in ``x``'s dtype: ``U (..., m, r)``, ``S (..., r)``, ``Vh (..., r, n)``.

    A float64 matrix on CPU goes to SciPy's LAPACK ``gesdd`` without the GIL (:func:`mergelab.ops.lapack.svd`:
    10-30 % faster than torch's MKL here; float64 results of the two agree to ~1e-14). Everything
    else goes to ``torch.linalg.svd``, a wide matrix as its transpose (MKL's ``gesdd`` took 3-5x
    longer on 768 x 3072 than on 3072 x 768, float32 and float64, this project's CPU) -- float32
    included: ``svd_dtype="float32"`` promises the official codes' numerics, which are torch's SVD,
    and float32 singular vectors of clustered small singular values differ from one LAPACK to the
    next (TSV-M of rank-4 + noise tasks: 0.3 apart, against 2e-7 with torch's own).
    """
    if x.device.type == "cpu" and x.dim() == 2 and x.dtype == torch.float64 and x.numel():
        with single_threaded_blas():
            U, S, Vh = lapack_svd(x.detach().numpy())
        return torch.from_numpy(U), torch.from_numpy(S), torch.from_numpy(Vh)
    if x.shape[-2] < x.shape[-1]:
        Ut, S, Vht = torch.linalg.svd(x.mT, full_matrices=False, driver=svd_driver(x.device))
        return Vht.mT, S, Ut.mT
    U, S, Vh = torch.linalg.svd(x, full_matrices=False, driver=svd_driver(x.device))
    return U, S, Vh


def tolerance(out_dtype: torch.dtype) -> float:
    """Largest error estimate accepted from the fast path when the result is cast to ``out_dtype``:
    a quarter of its unit roundoff for float32 and narrower types, 0 (always exact) for float64."""
    if out_dtype == torch.float64:
        return 0.0
    return torch.finfo(out_dtype).eps / 8  # eps / 2 is the unit roundoff


def solver(device: torch.device, dtype: torch.dtype, tol: float) -> str:
    """Which decomposition :func:`fast_svd` tries first for a matrix of ``dtype`` on ``device``:
    ``"gram"`` (float64 Gram matrix + ``eigh``, on CPU or CUDA alike) when the result may carry an
    error of ``tol > 0``, else the exact ``torch.linalg.svd``: ``"lapack"`` on CPU,
    ``"cusolver-<driver>"`` on CUDA (driver from :func:`svd_driver`). Float32 matrices (the official
    numerics, ``svd_dtype="float32"``) always take the exact path: squaring them would lose half
    their digits."""
    if tol > 0 and dtype == torch.float64:
        return "gram"
    driver = svd_driver(device)
    return "lapack" if driver is None else f"cusolver-{driver}"


def gram_eigh(
    x: torch.Tensor, top: int | None = None, floor: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """Eigenvalues (descending) and eigenvectors of ``x``'s Gram matrix on its smaller side -- only
    the ``top`` largest if given -- and whether ``x`` is tall (then the eigenvectors are its right
    singular vectors, else its left). ``None`` instead, before any eigendecomposition, when the
    smallest eigenvalue is certainly below ``floor`` times the largest (:func:`smallest_below`).
    Float64 on CPU: NumPy's ``a.T @ a`` (a ``syrk``: half the products of a general GEMM) and
    LAPACK's ``syevr`` for the ``top`` largest pairs only (MRRR: the vectors not asked for are never
    computed), ``syevd`` for all of them -- SciPy's LAPACK called without the GIL
    (:func:`mergelab.ops.lapack.eigh_top`), so that tensors merged at once run in parallel; SciPy's BLAS on one
    thread (:func:`mergelab.ops.lapack.single_threaded_blas`). Measured on this project's 2-core AMD EPYC, one
    thread, a 3072 x 768 task matrix: Gram 39 ms vs 70 (torch, MKL), top-97 of 768 eigenpairs 52 ms
    vs 98 (torch ``eigh``, all pairs); all 768 pairs 80 ms. Elsewhere (float32, CUDA): torch's
    product and ``eigh``; both give the same pairs."""
    tall = x.shape[-2] >= x.shape[-1]
    r = min(x.shape[-2:])
    top = r if top is None else min(top, r)
    on_lapack = x.device.type == "cpu" and x.dtype == torch.float64 and x.dim() == 2
    with single_threaded_blas() if on_lapack else nullcontext():
        if on_lapack:
            a = x.detach().numpy()
            gram = torch.from_numpy(a.T @ a if tall else a @ a.T)
        else:
            gram = x.mT @ x if tall else x @ x.mT  # (r, r), r = min(m, n)
        if floor > 0 and smallest_below(gram, floor):
            return None
        if on_lapack:
            lam, w = (torch.from_numpy(v) for v in eigh_top(gram.numpy(), top))
        else:
            lam, w = torch.linalg.eigh(gram)  # ascending
            lam, w = lam.flip(-1)[..., :top], w.flip(-1)[..., :top]
    return lam, w, tall


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``; float64 2-D CPU tensors through NumPy's BLAS (OpenBLAS, one thread), faster here than
    torch's MKL on this AMD CPU (one thread: 768 x 768 x 768 17 ms vs 20; 3072 x 768 x 97 12.5 ms vs
    17), the GIL released alike."""
    if a.device.type == "cpu" and a.dtype == b.dtype == torch.float64 and a.dim() == b.dim() == 2:
        with single_threaded_blas():
            return torch.from_numpy(a.detach().numpy() @ b.detach().numpy())
    return a @ b


def smallest_below(gram: torch.Tensor, ratio: float) -> bool:
    """Whether the symmetric positive semi-definite ``gram``'s smallest eigenvalue is certainly below
    ``ratio`` times its largest, at a small fraction of an eigendecomposition's cost: then the
    Cholesky factorisation of ``gram - mu I`` fails, with ``mu = ratio * rho`` and ``rho <= lam_1``
    a Rayleigh quotient after a few power steps (8 ms on 768 x 768, mostly the factorisation, against 80 ms for all
    eigenpairs). Lets :func:`fast_svd` skip eigendecompositions whose error estimate would fail: the
    sums of square task matrices that Iso-C decomposes are mostly that ill-conditioned (4 of 7
    matrices per ViT-B/32 layer). A factorisation that succeeds proves nothing; the caller's error
    estimate still decides."""
    v = gram[:, int(gram.diagonal().argmax())]
    for _ in range(4):  # from the column of the largest diagonal entry: rho >= max_i G_ii already
        norm = torch.linalg.vector_norm(v)
        if not bool(norm > 0):
            return True  # a zero matrix: no eigenvalue is resolved
        v = gram @ (v / norm)
    rho = float(v @ (gram @ v)) / float(v @ v)
    shifted = gram.clone()
    shifted.diagonal().sub_(ratio * rho)
    return bool(torch.linalg.cholesky_ex(shifted).info > 0)


def error_estimate(lam: torch.Tensor, k: int, gap: bool = False) -> float:
    """Relative error of the top-``k`` triplets derived from the Gram eigenvalues ``lam`` (descending):
    ``eps64 * lam_1 / lam_k``, or over ``min(lam_k, lam_k - lam_{k+1})`` with ``gap`` (the kept
    subspace itself used unweighted). ``inf`` when that denominator is not positive."""
    if k == 0:
        return 0.0
    floor = lam[k - 1]
    if gap and k < lam.shape[-1]:
        floor = torch.minimum(floor, lam[k - 1] - lam[k])
    if not bool(floor > 0):
        return float("inf")
    return float(EPS64 * lam[0] / floor)


def fast_svd(
    x: torch.Tensor, k: int | None = None, tol: float = 0.0, *, gap: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets of the 2-D ``x`` (all ``min(m, n)`` when ``k`` is None):
    ``U (m, k)``, ``S (k,)``, ``Vh (k, n)``, from the Gram path if its :func:`error_estimate` is at
    most ``tol``, else from the exact SVD (which is what ``tol=0`` always gives)."""
    r = min(x.shape)
    k = r if k is None else min(k, r)
    if k > 0 and solver(x.device, x.dtype, tol) == "gram":
        # every triplet used: the estimate divides by the smallest eigenvalue, which a Cholesky
        # factorisation checks first (ill-conditioned sums go straight to the exact path)
        found = gram_eigh(x, k + 1, EPS64 / tol if k == r else 0.0)  # lam[k] too: the gap below the kept directions
        if found is not None and error_estimate(found[0], k, gap) <= tol:
            lam, w, tall = found
            s = lam[:k].sqrt()
            w = w[:, :k]
            if tall:
                return matmul(x, w / s), s, w.mT  # U = x V / s
            return w, s, matmul((w / s).mT, x)  # Vh = U^T x / s
    U, S, Vh = svd(x)
    return U[:, :k], S[:k], Vh[:k]
