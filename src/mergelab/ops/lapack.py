"""LAPACK's symmetric eigensolvers and SVD, called without holding Python's GIL, and SciPy's BLAS kept
to one thread while they run.

SciPy's own wrappers (``scipy.linalg.eigh``, ``scipy.linalg.lapack``) hold the GIL for the whole
LAPACK call: two threads decomposing two matrices took as long as one thread decomposing both
(measured: 8 top-97 ``syevr`` calls on 768 x 768, 0.58 s on one thread, 0.59 s on two). The engine
merges several tensors at once on CPU (``engine.stream``), so the spectral methods call the same
LAPACK routines -- SciPy's, through the function pointers it exports for Cython
(``scipy.linalg.cython_lapack``) -- with :mod:`ctypes`, which releases the GIL during a foreign
call: 0.43 s on one thread, 0.22 s on two. Same routine, same library, same results (bit for bit).
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

_ARGS = {"dsyevr": 21, "dsyevd": 11, "dgesdd": 14, "sgesdd": 14}  # (cython_lapack.pxd); every argument a pointer


@functools.cache
def _routine(name: str) -> Callable[..., None]:
    """The LAPACK routine ``name`` as a ctypes function (every argument a pointer, as in Fortran)."""
    import scipy.linalg.cython_lapack as cython_lapack  # type: ignore[import-untyped]

    capsule = cython_lapack.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(capsule, get_name(capsule))
    return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * _ARGS[name])(address)  # CFUNCTYPE: GIL released


def _int(value: int) -> Any:
    return ctypes.byref(ctypes.c_int(value))


def _double(value: float) -> Any:
    return ctypes.byref(ctypes.c_double(value))


def eigh_top(a: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` largest eigenvalues (descending) and their eigenvectors (columns) of the symmetric
    float64 ``a`` (n x n, C-contiguous; overwritten). ``top < n``: ``dsyevr`` (MRRR: eigenvectors
    not asked for are never computed); ``top == n``: ``dsyevd`` (divide and conquer, faster for all
    pairs). The same drivers ``scipy.linalg.eigh`` uses for ``driver="evr"`` / ``"evd"``.
    Raises ``numpy.linalg.LinAlgError`` if LAPACK reports a failure."""
    n = a.shape[0]
    if a.shape != (n, n) or a.dtype != np.float64 or not a.flags.c_contiguous:
        raise ValueError("eigh_top takes a square, C-contiguous float64 array")
    if not 0 < top <= n:
        raise ValueError(f"top={top} is not in 1..{n}")
    info = ctypes.c_int(0)
    if top < n:
        w, vectors, found = np.empty(n), np.empty((top, n)), ctypes.c_int(0)
        support = np.empty(2 * top, dtype=np.intc)
        head = [b"V", b"I", b"L", _int(n), a.ctypes.data, _int(n), _double(0.0), _double(0.0), _int(n - top + 1), _int(n),
                _double(0.0), ctypes.byref(found), w.ctypes.data, vectors.ctypes.data, _int(n), support.ctypes.data]
        work, iwork = _workspace(_routine("dsyevr"), head, info)
        _routine("dsyevr")(*head, work.ctypes.data, _int(work.size), iwork.ctypes.data, _int(iwork.size), ctypes.byref(info))
        if info.value == 0 and found.value != top:
            info.value = -100  # never seen; not what was asked for
    else:
        w, vectors = np.empty(n), a  # eigenvectors overwrite a
        head = [b"V", b"L", _int(n), a.ctypes.data, _int(n), w.ctypes.data]
        work, iwork = _workspace(_routine("dsyevd"), head, info)
        _routine("dsyevd")(*head, work.ctypes.data, _int(work.size), iwork.ctypes.data, _int(iwork.size), ctypes.byref(info))
    if info.value != 0:
        raise np.linalg.LinAlgError(f"LAPACK symmetric eigensolver failed (info={info.value})")
    # ascending in LAPACK; a Fortran column (one eigenvector) is a row of the C-ordered result
    return w[:top][::-1].copy(), vectors[::-1].T.copy()


def svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reduced SVD ``U (m, r)``, ``s (r,)`` descending, ``Vh (r, n)`` of the 2-D float32 or float64
    ``x`` (left unchanged) by LAPACK's ``gesdd`` (divide and conquer, what ``torch.linalg.svd`` runs
    on CPU, there MKL's). LAPACK is always handed the tall orientation (rows >= columns), the faster
    one here. One thread, this project's 2-core AMD EPYC, against torch 2.13's MKL (best orientation):
    768 x 768 float64 176 ms vs 198, float32 95 vs 112; 3072 x 768 float64 332-415 ms vs 475, float32
    202-234 vs 267. Raises ``numpy.linalg.LinAlgError`` if LAPACK reports a failure."""
    m, n = x.shape
    if x.dtype not in (np.float32, np.float64):
        raise ValueError("svd takes a 2-D float32 or float64 array")
    tall = m >= n
    # LAPACK reads column-major: a C-ordered copy of x^T is x to it (tall); a C-ordered copy of a wide x is x^T
    a = np.array(x.T if tall else x, order="C", copy=True)  # always a copy: gesdd overwrites it
    rows, cols = (m, n) if tall else (n, m)
    r = min(m, n)
    s, left, right = np.empty(r, x.dtype), np.empty((r, rows), x.dtype), np.empty((cols, r), x.dtype)
    iwork, info = np.empty(max(1, 8 * r), dtype=np.intc), ctypes.c_int(0)
    routine = _routine("dgesdd" if x.dtype == np.float64 else "sgesdd")
    head = [b"S", _int(rows), _int(cols), a.ctypes.data, _int(rows), s.ctypes.data, left.ctypes.data, _int(rows),
            right.ctypes.data, _int(r)]
    size = np.zeros(1, x.dtype)
    routine(*head, size.ctypes.data, _int(-1), iwork.ctypes.data, ctypes.byref(info))
    work = np.empty(max(1, int(size[0])), x.dtype)
    routine(*head, work.ctypes.data, _int(work.size), iwork.ctypes.data, ctypes.byref(info))
    if info.value != 0:
        raise np.linalg.LinAlgError(f"LAPACK gesdd failed (info={info.value})")
    # column-major U (rows x r) is the C array `left` transposed, column-major VT (r x cols) is `right` transposed
    if tall:
        return left.T, s, right.T
    return right, s, left  # x^T = U' S V'^T, so x = V' S U'^T


def _workspace(routine: Callable[..., None], head: list[Any], info: ctypes.c_int) -> tuple[np.ndarray, np.ndarray]:
    """The optimal work arrays, from LAPACK's workspace query (``lwork = liwork = -1``)."""
    size, isize = ctypes.c_double(0.0), ctypes.c_int(0)
    routine(*head, ctypes.byref(size), _int(-1), ctypes.byref(isize), _int(-1), ctypes.byref(info))
    return np.empty(max(1, int(size.value))), np.empty(max(1, isize.value), dtype=np.intc)


_LIMIT_LOCK = threading.Lock()
_limit_depth = 0
_limit: Any = None


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """NumPy's and SciPy's BLAS/LAPACK on one thread while any thread is inside this context, then
    as before. Thread-safe (a count of the threads inside; threadpoolctl's own ``limit`` restores
    whatever it saw on entry, which is wrong when entries and exits of two threads interleave).

    Why one thread: SciPy's BLAS has its own thread pool, which ignores ``torch.set_num_threads``;
    with two, its worker thread and torch's OpenMP threads (both spin-wait between calls) fought
    for the 2 cores of this project's machine and TSV-M took 10.7 s instead of 6.2 s per layer.
    Parallelism comes from merging several tensors at once instead (``engine.stream``)."""
    global _limit_depth, _limit
    with _LIMIT_LOCK:
        if _limit_depth == 0:
            _limit = _blas_controller().limit(limits=1, user_api="blas")
        _limit_depth += 1
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            _limit_depth -= 1
            if _limit_depth == 0:
                _limit.restore_original_limits()
                _limit = None


@functools.cache
def _blas_controller() -> Any:
    """threadpoolctl's view of the loaded BLAS libraries, built once (after SciPy is loaded)."""
    import scipy.linalg  # noqa: F401  (loads SciPy's BLAS, so that the controller sees it)
    from threadpoolctl import ThreadpoolController  # type: ignore[import-untyped]

    return ThreadpoolController()
