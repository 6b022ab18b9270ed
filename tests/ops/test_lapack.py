"""The GIL-free LAPACK eigensolvers (``_lapack.eigh_top``) give SciPy's results bit for bit, and the
one-thread BLAS context is safe when threads enter and leave it interleaved."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import eigh
from threadpoolctl import threadpool_info, threadpool_limits

from mergelab.ops.lapack import _routine, eigh_top, single_threaded_blas, svd


def symmetric(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n + 3, n))
    return x.T @ x


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 70), st.integers(0, 10_000), st.data())
def test_eigh_top_is_scipys_eigh_bit_for_bit(n, seed, data):
    top = data.draw(st.integers(1, n))
    a = symmetric(n, seed)
    lam, w = eigh_top(a.copy(), top)
    if top < n:
        lam_ref, w_ref = eigh(a, subset_by_index=[n - top, n - 1], driver="evr")
    else:
        lam_ref, w_ref = eigh(a, driver="evd")
    assert lam.shape == (top,) and w.shape == (n, top) and w.flags.c_contiguous
    assert np.array_equal(lam, lam_ref[::-1]) and np.array_equal(w, w_ref[:, ::-1])


def test_eigh_top_by_hand():
    a = np.diag([1.0, 4.0, 2.0])
    lam, w = eigh_top(a.copy(), 2)
    assert np.array_equal(lam, [4.0, 2.0])
    assert np.array_equal(np.abs(w), [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize(("array", "top"), [(np.eye(3, dtype=np.float32), 1), (np.eye(3)[:, :2], 1),
                                            (np.asfortranarray(np.ones((3, 4)))[:, :3], 1), (np.eye(3), 0), (np.eye(3), 4)])
def test_eigh_top_refuses_what_it_does_not_take(array, top):
    with pytest.raises(ValueError):
        eigh_top(array, top)


def test_the_calls_release_the_gil():
    """ctypes releases the GIL around a foreign call unless the function type is a PYFUNCTYPE."""
    for name in ("dsyevr", "dsyevd", "dgesdd", "sgesdd"):
        assert not type(_routine(name))._flags_ & ctypes._FUNCFLAG_PYTHONAPI  # type: ignore[attr-defined]


def blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_single_threaded_blas_nested_across_threads():
    """The engine's thread enters first; a worker enters and leaves inside: still one thread until the
    engine's thread leaves, then the setting before is back. (OpenBLAS applies a thread count set
    from another thread than the main one inconsistently; the engine sets it from its own thread,
    engine.runtime.quiet_runtime, before any worker starts.)"""

    def worker() -> None:
        with single_threaded_blas():
            pass

    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        with single_threaded_blas():
            assert set(blas_threads()) == {1}
            thread = threading.Thread(target=worker)
            thread.start()
            thread.join()
            assert set(blas_threads()) == {1}
        assert blas_threads() == before


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 50), st.integers(1, 50), st.sampled_from([np.float64, np.float32]), st.integers(0, 10_000))
def test_svd_is_an_exact_reduced_svd(m, n, dtype, seed):
    """Any orientation and precision: singular values as torch's, U and Vh orthonormal, U S Vh = x, x untouched."""
    import torch

    x = np.random.default_rng(seed).standard_normal((m, n)).astype(dtype)
    before = x.copy()
    U, s, Vh = svd(x)
    r = min(m, n)
    eps = np.finfo(dtype).eps
    assert U.shape == (m, r) and s.shape == (r,) and Vh.shape == (r, n) and U.dtype == s.dtype == Vh.dtype == dtype
    assert np.array_equal(x, before) and np.all(np.diff(s) <= 0)
    assert np.allclose(s, torch.linalg.svdvals(torch.from_numpy(x)).numpy(), rtol=0, atol=50 * eps * s[0])
    assert np.allclose(U.T @ U, np.eye(r), atol=50 * r * eps) and np.allclose(Vh @ Vh.T, np.eye(r), atol=50 * r * eps)
    assert np.allclose((U * s) @ Vh, x, atol=50 * max(m, n) * eps * s[0])


def test_svd_by_hand():
    U, s, Vh = svd(np.array([[3.0, 0.0], [0.0, -2.0], [0.0, 0.0]]))
    assert np.array_equal(s, [3.0, 2.0])
    assert np.array_equal(np.abs(U), [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]) and np.array_equal(np.abs(Vh), np.eye(2))
    assert np.array_equal((U * s) @ Vh, [[3.0, 0.0], [0.0, -2.0], [0.0, 0.0]])
