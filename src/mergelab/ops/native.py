"""Compiled kernels for TIES (its streaming passes) and task arithmetic: built on first use, loaded with ctypes.

The selection passes (histograms, or a count in a window) and the merge pass of TIES (global scope
by chunks, per-tensor scope on whole tensors), and task arithmetic's merge pass, are per-element arithmetic that eager torch runs as separate operations over ``(T, chunk)`` arrays (~14
for TIES), each reading and writing memory; ``kernels.cpp`` (beside this module) does each pass in
one loop (the TIES merge: 1.1 ns per position for T = 3 against ~18 ns for the torch operations, one
thread). They are a pure speed-up: the same IEEE operations, so the same thresholds (exact
selection) and the same merged bits, except that sums over the task vectors always run t = 0..T-1
where torch's vectorised sum groups the last (chunk mod 32) positions of a chunk differently (float
rounding there; ``tests/ops/test_native.py`` checks both). Every input they do not take --
float16 or float64 storage, mixed storage dtypes, float64 compute, a GPU, more than 8 models for a
merge pass -- goes through the plain torch path.

The source is compiled once per machine with the system's C++ compiler (``$CXX``, else ``c++``;
``-O3 -march=native`` (without it if the compiler refuses it), never ``-ffast-math``, and
``-ffp-contract=off`` so that no multiply-add is fused) into ``$MERGELAB_CACHE/native`` (default
``~/.cache/mergelab/native``), under a name hashing the source, the flags, the compiler and the
CPU's features; a second process reuses it (only if it and its folder belong to this user and
nobody else may write them). Without a compiler, merges run on the torch path (a warning says so
once). ``MERGELAB_NATIVE=0`` turns the kernels off. ctypes releases the GIL during each call, so
the engine's chunk threads run them in parallel.
"""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import threading
import warnings
from pathlib import Path

import torch

from mergelab.native_build import build_library

SOURCE = Path(__file__).with_name("kernels.cpp")
_FLAGS = ("-std=c++17", "-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")
_ABI_VERSION = 1
_STORAGE = {torch.bfloat16: 0, torch.float32: 1}  # kernels.cpp's Storage
MERGE_FUNCS = {"mean": 0, "sum": 1, "max": 2}  # kernels.cpp's MergeFunc
MAX_MERGE_MODELS = 8  # ties_merge and task_arithmetic take T <= 8 (a compile-time T per instantiation)

_P = ctypes.c_void_p


class Kernels:
    """The compiled functions, taking torch tensors (1-D, contiguous, CPU)."""

    def __init__(self, library: ctypes.CDLL):
        self._lib = library
        library.mergelab_abs_diff_high_counts.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int, _P, _P, _P]
        library.mergelab_abs_diff_high_counts.restype = ctypes.c_int
        library.mergelab_abs_diff_window_counts.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int, _P, _P, _P,
                                                            ctypes.c_uint32, _P, _P]
        library.mergelab_abs_diff_window_counts.restype = ctypes.c_int
        library.mergelab_abs_diff_digit_counts.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int, _P, _P, _P, _P]
        library.mergelab_abs_diff_digit_counts.restype = None
        library.mergelab_ties_merge.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int, _P, _P, _P, ctypes.c_float,
                                                ctypes.c_int, _P, _P, _P, _P, _P]
        library.mergelab_ties_merge.restype = ctypes.c_int
        library.mergelab_task_arithmetic.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int, _P, _P, ctypes.c_float, _P]
        library.mergelab_task_arithmetic.restype = ctypes.c_int

    def abs_diff_high_counts(self, base: torch.Tensor, models: list[torch.Tensor], counts: torch.Tensor) -> bool:
        """``counts[t, key >> 16] += 1`` for the float32 bits ``key`` of every ``|models[t] - base|``
        (``counts``: ``(T, 32768)`` int64). False if a difference is Inf or NaN (counts then partial)."""
        _check_counts(counts, (len(models), 32768))
        return bool(self._lib.mergelab_abs_diff_high_counts(base.numel(), len(models), _STORAGE[base.dtype],
                                                            base.data_ptr(), _pointers(models), counts.data_ptr()))

    def abs_diff_window_counts(self, base: torch.Tensor, models: list[torch.Tensor], lows: torch.Tensor, width: int,
                               above: torch.Tensor, fine: torch.Tensor) -> bool:
        """For the keys of ``|models[t] - base|``: ``above[t] +=`` how many have high 16 bits at or past
        ``lows[t] + width``; ``fine[t, p, key & 0xFFFF] += 1`` for those whose high 16 bits are ``lows[t] + p``,
        ``0 <= p < width`` (``lows``: ``(T,)`` int32 >= 0; ``above``: ``(T,)`` int64; ``fine``: ``(T, width,
        65536)`` int64). False if a difference is Inf or NaN (counts then partial)."""
        assert lows.dtype == torch.int32 and lows.shape == (len(models),) and bool((lows >= 0).all())
        _check_counts(above, (len(models),))
        _check_counts(fine, (len(models), width, 65536))
        return bool(self._lib.mergelab_abs_diff_window_counts(base.numel(), len(models), _STORAGE[base.dtype],
                                                              base.data_ptr(), _pointers(models), lows.data_ptr(),
                                                              width, above.data_ptr(), fine.data_ptr()))

    def abs_diff_digit_counts(self, base: torch.Tensor, models: list[torch.Tensor], prefixes: torch.Tensor,
                              counts: torch.Tensor) -> None:
        """``counts[t, key & 0xFFFF] += 1`` for the keys of ``|models[t] - base|`` whose high 16 bits
        are ``prefixes[t]`` (``prefixes``: ``(T,)`` int32; ``counts``: ``(T, 65536)`` int64)."""
        assert prefixes.dtype == torch.int32 and prefixes.shape == (len(models),)
        _check_counts(counts, (len(models), 65536))
        self._lib.mergelab_abs_diff_digit_counts(base.numel(), len(models), _STORAGE[base.dtype], base.data_ptr(),
                                                 _pointers(models), prefixes.data_ptr(), counts.data_ptr())

    def ties_merge(self, base: torch.Tensor, models: list[torch.Tensor], thresholds: torch.Tensor, scaling: float,
                   merge_func: str, out: torch.Tensor) -> tuple[bool, int, torch.Tensor, torch.Tensor]:
        """Global TIES on one chunk (see ``kernels.cpp``): ``base + scaling * merged`` into ``out``.

        Returns ``(finite, sum of elected signs, waiting, trimmed)``: ``waiting`` lists the positions
        whose sign sum is 0 while a trimmed entry is not (merged with +1 for now), ``trimmed`` is
        ``(T, len(waiting))``, their trimmed task-vector entries. ``finite`` False: a task vector or
        result is Inf or NaN and ``out`` is not usable."""
        n, tasks = base.numel(), len(models)
        assert 1 <= tasks <= MAX_MERGE_MODELS and out.dtype == base.dtype and out.numel() == n and out.is_contiguous()
        assert thresholds.dtype == torch.float32 and thresholds.shape == (tasks,)
        waits, index = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.int64)
        trimmed, totals = torch.empty(tasks * n, dtype=torch.float32), torch.zeros(2, dtype=torch.int64)
        status = self._lib.mergelab_ties_merge(n, tasks, _STORAGE[base.dtype], base.data_ptr(), _pointers(models),
                                               thresholds.data_ptr(), scaling, MERGE_FUNCS[merge_func], out.data_ptr(),
                                               waits.data_ptr(), index.data_ptr(), trimmed.data_ptr(), totals.data_ptr())
        waiting = int(totals[1])
        return status == 1, int(totals[0]), index[:waiting], trimmed[: tasks * waiting].view(tasks, waiting)

    def task_arithmetic(self, base: torch.Tensor, models: list[torch.Tensor], scaling: float, out: torch.Tensor) -> bool:
        """``out = base + scaling * sum_t (models[t] - base)`` (in float32, stored in ``out``'s dtype).
        False if a task vector or result is Inf or NaN (``out`` then not usable)."""
        n, tasks = base.numel(), len(models)
        assert 1 <= tasks <= MAX_MERGE_MODELS and out.dtype == base.dtype and out.numel() == n and out.is_contiguous()
        status = self._lib.mergelab_task_arithmetic(n, tasks, _STORAGE[base.dtype], base.data_ptr(), _pointers(models),
                                                    scaling, out.data_ptr())
        return bool(status == 1)


def _check_counts(counts: torch.Tensor, shape: tuple[int, ...]) -> None:
    if counts.dtype != torch.int64 or counts.shape != shape or not counts.is_contiguous():
        raise ValueError(f"counts must be a contiguous {shape} int64 tensor")


def takes(base: torch.Tensor, models: list[torch.Tensor]) -> bool:
    """Whether the kernels take these stored chunks: CPU, 1-D contiguous, one storage dtype that they know."""
    tensors = (base, *models)
    return (takes_dtypes(base.dtype, [m.dtype for m in models])
            and all(t.device.type == "cpu" and t.dim() == 1 and t.is_contiguous() for t in tensors))


def takes_dtypes(base: torch.dtype, models: list[torch.dtype]) -> bool:
    """Whether the kernels take a tensor stored in these dtypes: bfloat16 or float32, the same in every input."""
    return base in _STORAGE and all(dtype == base for dtype in models)


def usable(device: torch.device, compute_dtype: torch.dtype) -> bool:
    """Whether a merge on ``device`` computing in ``compute_dtype`` may use the kernels at all."""
    return device.type == "cpu" and compute_dtype == torch.float32 and kernels() is not None


def kernels() -> Kernels | None:
    """The compiled kernels, built on first use; ``None`` if turned off or they cannot be built (decided once)."""
    global _KERNELS, _TRIED
    if not _TRIED:
        with _LOCK:
            if not _TRIED:
                _KERNELS, _TRIED = _load(), True
    return _KERNELS


_KERNELS: Kernels | None = None
_TRIED = False
_LOCK = threading.Lock()


def _load() -> Kernels | None:
    if os.environ.get("MERGELAB_NATIVE", "1") == "0":
        return None
    try:
        library = ctypes.CDLL(str(build()))
        if library.mergelab_abi_version() != _ABI_VERSION:
            raise OSError("stale kernel library")
        return Kernels(library)
    except (OSError, subprocess.SubprocessError) as err:
        reason = (str(err).strip().splitlines() or [repr(err)])[0]
        warnings.warn(f"mergelab: compiled kernels unavailable ({reason}); global TIES and task arithmetic run on "
                      "the slower torch path (MERGELAB_NATIVE=0 silences this)", stacklevel=3)
        return None


def build(cache_dir: Path | None = None) -> Path:
    """Compile ``kernels.cpp`` into the cache (once per source, flags, compiler and CPU) and return the library's path."""
    without_march = tuple(f for f in _FLAGS if f != "-march=native")  # some compilers lack -march=native
    return build_library(SOURCE, "kernels", (_FLAGS, without_march), key_extra=_cpu_features(), cache_dir=cache_dir)


def _cpu_features() -> bytes:
    """What ``-march=native`` depends on: the CPU's feature flags (Linux), else the platform's description."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.encode()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}".encode()


def _pointers(tensors: list[torch.Tensor]) -> ctypes.Array[ctypes.c_void_p]:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
