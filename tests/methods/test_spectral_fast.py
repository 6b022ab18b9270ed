"""The fast SVD path (``methods/_svd.py``): float64 Gram matrix + ``eigh``, its error estimate, the
exact fallback, the solver choice, and every spectral method's fast path against the exact float64
reference (``tol=0``)."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mergelab.methods.cart import cart, cart_matrix
from mergelab.methods.iso_c import iso_c, iso_c_matrix
from mergelab.methods.iso_cts import iso_cts, iso_cts_matrix
from mergelab.methods.registry import TensorCtx
from mergelab.methods.tsv import tsv, tsv_matrix
from mergelab.ops.svd import EPS64, error_estimate, fast_svd, solver, svd, svd_driver, tolerance
from tests.helpers import assert_close

TOL32 = tolerance(torch.float32)
_svd_module = sys.modules["mergelab.ops.svd"]
_spectral_module = sys.modules["mergelab.ops.spectral"]


@pytest.fixture
def paths(monkeypatch):
    """Counts how often the Gram path's eigendecomposition and the exact SVD run (and Gram matrices
    found too ill-conditioned to decompose: ``skipped``)."""
    counts = {"gram": 0, "exact": 0, "skipped": 0}
    gram_eigh, exact = _svd_module.gram_eigh, _svd_module.svd

    def counting_gram(x, top=None, floor=0.0):
        found = gram_eigh(x, top, floor)
        counts["gram" if found is not None else "skipped"] += 1
        return found

    def counting_exact(x):
        counts["exact"] += 1
        return exact(x)

    for module in (_svd_module, _spectral_module):  # polar_and_spectrum calls them from _spectral
        monkeypatch.setattr(module, "gram_eigh", counting_gram)
        monkeypatch.setattr(module, "svd", counting_exact)
    return counts


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm()) if bool(ref.norm() > 0) else float(x.norm())


def test_tolerance_and_solver_choice():
    assert tolerance(torch.float32) == torch.finfo(torch.float32).eps / 8  # 1.5e-8: below float32 rounding
    assert tolerance(torch.float64) == 0.0  # a float64 result always gets the exact SVD
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert solver(cpu, torch.float64, TOL32) == "gram"
    assert solver(cuda, torch.float64, TOL32) == "gram"  # eigh runs where the tensor is
    assert solver(cpu, torch.float64, 0.0) == "lapack"
    assert solver(cpu, torch.float32, TOL32) == "lapack"  # svd_dtype="float32": official numerics, exact
    assert solver(cuda, torch.float64, 0.0) == "cusolver-gesvd"
    assert solver(cuda, torch.float32, TOL32) == "cusolver-gesvd"
    assert svd_driver(cpu) is None and svd_driver(cuda) == "gesvd"


def test_error_estimate_by_hand():
    lam = torch.tensor([4.0, 1.0, 1.0, 0.0], dtype=torch.float64)  # Gram eigenvalues, descending
    assert error_estimate(lam, 0) == 0.0
    assert error_estimate(lam, 1) == EPS64  # eps * 4 / 4
    assert error_estimate(lam, 2) == EPS64 * 4  # eps * 4 / 1
    assert error_estimate(lam, 1, gap=True) == EPS64 * 4 / 3  # gap 4 - 1 = 3 < 4
    assert error_estimate(lam, 2, gap=True) == float("inf")  # lam_2 = lam_3: the kept subspace is not defined
    assert error_estimate(lam, 4) == float("inf")  # a zero singular value is used


def test_gram_path_by_hand(paths):
    # x = [[0, 3], [4, 0], [0, 0]]: x^T x = diag(16, 9), so s = (4, 3), V = (e1, e2), U = x V / s = (e2, e1)
    x = torch.tensor([[0.0, 3.0], [4.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    U, S, Vh = fast_svd(x, None, TOL32)
    assert paths == {"gram": 1, "exact": 0, "skipped": 0}
    assert_close(S, torch.tensor([4.0, 3.0], dtype=torch.float64), rtol=0, atol=1e-15)
    assert_close((U * S) @ Vh, x, rtol=0, atol=1e-14)
    assert_close(U.abs(), torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64), rtol=0, atol=1e-15)
    # wide: the transpose, decomposed on the same 2 x 2 Gram matrix
    U, S, Vh = fast_svd(x.mT, 1, TOL32)
    assert_close((U * S) @ Vh, torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64), rtol=0, atol=1e-14)


def test_rank_deficient_input_takes_the_exact_path(paths):
    x = torch.outer(torch.arange(1.0, 6.0), torch.arange(1.0, 5.0)).double()  # rank 1
    fast = fast_svd(x, None, TOL32)  # every triplet used: zero singular values, seen before decomposing
    assert paths == {"gram": 0, "exact": 1, "skipped": 1}
    for got, want in zip(fast, svd(x), strict=True):
        assert torch.equal(got, want)
    U, S, Vh = fast_svd(x, 1, TOL32)  # only the top triplet: well conditioned, the fast path stands
    assert paths == {"gram": 1, "exact": 1, "skipped": 1}
    assert_close((U * S) @ Vh, x, rtol=1e-14, atol=0)


def test_tol_zero_and_float32_never_try_the_gram_path(paths):
    x = torch.randn(6, 4, dtype=torch.float64)
    fast_svd(x, None, 0.0)
    fast_svd(x.float(), None, TOL32)
    assert paths == {"gram": 0, "exact": 2, "skipped": 0}


def test_exact_svd_of_a_wide_matrix_goes_through_its_transpose():
    x = torch.randn(5, 9, dtype=torch.float64)
    U, S, Vh = svd(x)
    assert U.shape == (5, 5) and S.shape == (5,) and Vh.shape == (5, 9)
    assert_close((U * S) @ Vh, x, rtol=1e-13, atol=1e-13)
    assert_close(Vh @ Vh.mT, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-13)
    assert_close(S, torch.linalg.svdvals(x), rtol=1e-13, atol=0)


def _structured(kind: str, n_tasks: int, m: int, n: int, seed: int) -> torch.Tensor:
    """Stacked task matrices (float32 values held in float64, as the methods see them)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        taus = torch.randn(n_tasks, m, n, generator=gen)
    elif kind == "low_rank_plus_noise":
        taus = torch.randn(n_tasks, m, 3, generator=gen) @ torch.randn(n_tasks, 3, n, generator=gen)
        taus += 1e-2 * torch.randn(n_tasks, m, n, generator=gen)
    elif kind == "decaying":  # singular values i^-1
        r = min(m, n)
        q1 = torch.linalg.qr(torch.randn(n_tasks, m, r, generator=gen))[0]
        q2 = torch.linalg.qr(torch.randn(n_tasks, n, r, generator=gen))[0]
        taus = (q1 * torch.arange(1.0, r + 1) ** -1) @ q2.mT
    elif kind == "shared_plus_specific":
        taus = torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen)
        taus = taus + torch.randn(n_tasks, m, 2, generator=gen) @ torch.randn(n_tasks, 2, n, generator=gen)
    elif kind == "zero_task":
        taus = torch.randn(n_tasks, m, n, generator=gen)
        taus[0] = 0
    else:  # "duplicate"
        taus = torch.randn(n_tasks, m, n, generator=gen)
        taus[-1] = taus[0]
    return taus.float().double()


KINDS = ["gauss", "low_rank_plus_noise", "decaying", "shared_plus_specific", "zero_task", "duplicate"]


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(KINDS[:4]),
    st.integers(2, 40),
    st.integers(2, 40),
    st.integers(0, 10_000),
    st.one_of(st.none(), st.integers(1, 40)),
)
def test_fast_svd_matches_the_float64_reference_within_its_estimate(kind, m, n, seed, k):
    x = _structured(kind, 1, m, n, seed)[0]
    r = min(m, n)
    kk = r if k is None else min(k, r)
    lam = _svd_module.gram_eigh(x)[0]
    estimate = error_estimate(lam, kk)
    U, S, Vh = fast_svd(x, k, TOL32)
    Ue, Se, Vhe = svd(x)
    assert U.shape == (m, kk) and S.shape == (kk,) and Vh.shape == (kk, n)
    floor = 1e3 * EPS64  # rounding of the products themselves
    # the estimate bounds the measured error (it is an estimate: measured 3-100x below it)
    assert _rel(S, Se[:kk]) <= estimate + floor
    assert _rel((U * S) @ Vh, (Ue[:, :kk] * Se[:kk]) @ Vhe[:kk]) <= estimate + floor
    if k is None and estimate <= TOL32:  # the polar factor (Iso-C, TSV-M) from every triplet
        assert _rel(U @ Vh, Ue @ Vhe) <= estimate + floor


METHODS = {
    "tsv": (lambda t, tol: tsv_matrix(t, torch.float64, tol), tsv, {}),
    "iso_c": (lambda t, tol: iso_c_matrix(t, torch.float64, tol), iso_c, {}),
    "iso_cts": (
        lambda t, tol: iso_cts_matrix(t, 0.8, torch.float64, tol),
        iso_cts,
        {"common_space_fraction": 0.8},
    ),
    "cart": (
        lambda t, tol: cart_matrix(t, 0.25, 1.0, torch.float64, tol),
        cart,
        {"rank_ratio": 0.25, "preset": "paper", "center": True, "keep": "top", "route": None},
    ),
}


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(sorted(METHODS)),
    st.sampled_from(KINDS),
    st.integers(1, 5),
    st.integers(4, 32),
    st.integers(4, 32),
    st.integers(0, 10_000),
)
@example("iso_cts", "shared_plus_specific", 3, 10, 10, 0)  # ill-conditioned cases once seen to differ by 2-24 TOL32
@example("iso_cts", "shared_plus_specific", 5, 17, 23, 4960)
@example("tsv", "shared_plus_specific", 4, 16, 27, 3607)
def test_every_method_fast_equals_the_exact_float64_reference(method, kind, n_tasks, m, n, seed):
    matrix_fn = METHODS[method][0]
    taus = _structured(kind, n_tasks, m, n, seed)
    exact = matrix_fn(taus, 0.0)
    fast = matrix_fn(taus, TOL32)
    assert fast.dtype == torch.float64
    # Where the method itself is ill-conditioned (the polar factor of a nearly rank-deficient stack of
    # singular vectors: TSV-M, Iso-CTS on shared + specific tasks), perturbations of float64 rounding
    # size already move the exact result by ~1e-8; the fast path may differ by that much too, no more.
    gen = torch.Generator().manual_seed(seed)
    jitter = 1 + 2 * EPS64 * torch.randn(taus.shape, generator=gen, dtype=taus.dtype)
    instability = _rel(matrix_fn(taus * jitter, 0.0), exact)
    assert _rel(fast, exact) <= TOL32 + 50 * instability


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", ["low_rank_plus_noise", "zero_task", "duplicate"])
def test_registered_methods_round_float32_results_like_the_reference(method, kind, paths):
    # the registered function: float32 task vectors, the fast path in float64, cast back to float32
    matrix_fn, fn, extra = METHODS[method]
    taus = _structured(kind, 4, 24, 40, 3).float()
    hp = {"scaling": 1.0, "exclude": [], "svd_dtype": "float64", **extra}
    got = fn(taus, torch.zeros(24, 40), TensorCtx("w"), **hp)
    exact = matrix_fn(taus, 0.0)  # same float32 input (Iso-C sums it in float32), exact SVDs
    assert got.dtype == exact.dtype == torch.float32
    assert paths["gram"] > 0  # the fast path was tried
    assert _rel(got.double(), exact.double()) <= 2 * torch.finfo(torch.float32).eps  # a few last-bit flips at most


def test_float64_compute_and_float32_svd_dtype_stay_exact(paths):
    taus = _structured("gauss", 3, 12, 20, 0)
    hp = {"scaling": 1.0, "exclude": []}
    tsv(taus, torch.zeros(12, 20), TensorCtx("w"), svd_dtype="float64", **hp)  # a float64 result: tol 0
    tsv(taus.float(), torch.zeros(12, 20), TensorCtx("w"), svd_dtype="float32", **hp)  # official numerics
    assert paths["gram"] == 0 and paths["exact"] > 0


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 60), st.integers(1, 60), st.one_of(st.none(), st.integers(1, 61)), st.integers(0, 10_000))
def test_scipy_gram_path_equals_the_torch_path(m, n, top, seed):
    """The float64 CPU path (NumPy syrk + LAPACK syevr/syevd, top pairs only) against torch's eigh."""
    x = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = min(m, n)
    want = r if top is None else min(top, r)
    lam, w, tall = _svd_module.gram_eigh(x, top)
    every, vectors = torch.linalg.eigh(x.mT @ x if m >= n else x @ x.mT)
    every, vectors = every.flip(0), vectors.flip(1)
    lam_ref, w_ref = every[:want], vectors[:, :want]
    assert tall == (m >= n) and lam.shape == (want,) and w.shape == (r, want)
    assert torch.allclose(lam, lam_ref, rtol=0, atol=1e3 * EPS64 * float(lam_ref[0]))
    # eigenvectors agree up to sign (random Gram matrices have distinct eigenvalues)
    signs = torch.sign((w * w_ref).sum(dim=0))
    spaced = torch.cat([every[:-1] - every[1:], torch.tensor([float("inf")], dtype=every.dtype)]) > 1e-6 * float(every[0])
    clear = spaced.clone()
    clear[1:] &= spaced[:-1]  # separated from both neighbours: the vector is unique up to sign
    assert torch.allclose((w * signs)[:, clear[:want]], w_ref[:, clear[:want]], atol=1e-6)


def test_scipy_gram_path_leaves_blas_threads_as_they_were():
    from threadpoolctl import threadpool_info

    before = [(lib["filepath"], lib["num_threads"]) for lib in threadpool_info()]
    _svd_module.gram_eigh(torch.randn(30, 20, dtype=torch.float64), 3)
    after = [(lib["filepath"], lib["num_threads"]) for lib in threadpool_info()]
    assert [entry for entry in after if entry in before] == before  # libraries loaded by the call may be added


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.floats(-12, 0), st.floats(-14, -1), st.integers(0, 10_000))
def test_smallest_below_is_never_wrong_when_it_says_so(n, log_smallest, log_ratio, seed):
    """A Gram matrix with eigenvalues 1 .. 10^log_smallest: when the check says the smallest is below
    ratio x the largest, it is (the check may miss a case; then the error estimate decides)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    lam = torch.logspace(0, log_smallest, n, dtype=torch.float64)
    gram = (q * lam) @ q.mT
    ratio = 10.0**log_ratio
    if _svd_module.smallest_below(gram, ratio):
        assert float(lam.min()) < ratio * float(lam.max()) * (1 + 1e-6)
    if float(lam.min()) < 0.25 * ratio * float(lam.max()):  # clearly below: the power steps' rho is within 4x of lam_1
        assert _svd_module.smallest_below(gram, ratio)


def test_smallest_below_by_hand():
    gram = torch.diag(torch.tensor([4.0, 1.0, 1e-3], dtype=torch.float64))
    assert _svd_module.smallest_below(gram, 1e-3)  # 1e-3 < 1e-3 x 4
    assert not _svd_module.smallest_below(gram, 1e-4)  # 1e-3 > 4e-4
    assert _svd_module.smallest_below(torch.zeros(3, 3, dtype=torch.float64), 1e-9)


def test_ill_conditioned_sums_skip_the_eigendecomposition(monkeypatch):
    """Every triplet used (Iso-C) and a Gram matrix too ill-conditioned for the tolerance: straight to
    the exact SVD, with the exact result; a well-conditioned one takes the Gram path."""
    calls = []
    real = _svd_module.eigh_top
    monkeypatch.setattr(_svd_module, "eigh_top", lambda *a: calls.append(a[1]) or real(*a))
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(60, 40, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    tol = _svd_module.tolerance(torch.float32)
    bad = (u * torch.logspace(0, -6, 40, dtype=torch.float64)) @ v.mT  # lam_1 / lam_40 = 1e12
    U, S, Vh = _svd_module.fast_svd(bad, None, tol)
    assert calls == []
    U0, S0, Vh0 = _svd_module.svd(bad)
    assert torch.equal(S, S0) and torch.equal(U, U0) and torch.equal(Vh, Vh0)
    good = (u * torch.logspace(0, -1, 40, dtype=torch.float64)) @ v.mT
    _svd_module.fast_svd(good, None, tol)
    assert calls == [40]


def test_torch_gram_path_matches_the_lapack_one_and_checks_the_floor_too():
    """The branch CUDA takes (torch's product and eigh; float32 here, on CPU) gives the LAPACK branch's
    pairs to float32 accuracy and skips ill-conditioned Gram matrices the same way."""
    gen = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(50, 30, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    x = (u * torch.linspace(3, 1, 30, dtype=torch.float64)) @ v.mT
    lam, w, tall = _svd_module.gram_eigh(x, 5)
    lam32, w32, tall32 = _svd_module.gram_eigh(x.float(), 5)
    assert tall and tall32 and lam32.dtype == torch.float32
    assert torch.allclose(lam32.double(), lam, rtol=1e-5)
    assert torch.allclose((w32.double() * w).sum(0).abs(), torch.ones(5, dtype=torch.float64), atol=1e-4)
    ill = (u * torch.logspace(0, -5, 30, dtype=torch.float64)) @ v.mT  # lam_1 / lam_30 = 1e10
    assert _svd_module.gram_eigh(ill.float(), None, 1e-8) is None and _svd_module.gram_eigh(ill, None, 1e-8) is None
    assert _svd_module.gram_eigh(ill, None, 1e-12) is not None
