"""The process settings a streaming merge runs best under (allocator, threads, garbage collection), set
for the merge and restored afterwards."""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from mergelab.engine.plan import MergePlan


def tune_malloc() -> None:
    """Keep freed memory in the allocator (glibc only; elsewhere a no-op).

    Column chunks make short-lived temporaries of ~1-4 MB. Above glibc's default mmap threshold each
    is a fresh ``mmap`` whose every 4 KB page faults when touched (about one fault per 4 KB of
    input, as much system time as compute). Raising the mmap threshold to its maximum (32 MiB)
    and the trim threshold above it serves them from reused heap memory instead; the memory kept
    back is bounded by the trim threshold (64 MiB) per allocator arena. Same effect as
    ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...``."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    except (OSError, AttributeError):  # not glibc
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


_MALLOC_TUNED = False


@contextmanager
def quiet_runtime(plan: MergePlan) -> Iterator[int]:
    """The process settings a streaming merge runs best under, restored afterwards.

    * One torch intra-op thread for chunked (elementwise) CPU work: a ~1 MB chunk gains little
      from splitting, and every parallel op waits for its slowest thread -- on a machine where
      another process keeps a core busy, 2 threads made a merge 9-45x slower than 1 (measured,
      2 cores). Instead, independent chunks run on as many Python threads as torch had intra-op
      threads (yielded; :func:`mergelab.engine.chunks.run_chunks`), each taking the next chunk when done, so a thread
      held up by another process or by the reader/writer threads just takes fewer. Likewise the
      whole tensors of ``tensor_parallel`` methods (the SVD methods): several merged at once, one
      thread each (``stream._merged_at_once``). Other whole-tensor methods keep torch's setting.
    * NumPy's and SciPy's BLAS on one thread for the SVD methods (:func:`one_blas_thread`).
    * No cyclic garbage collection: the loop allocates many small Python objects, and every
      collection walks all of torch's (6-8 % of a task-arithmetic merge); nothing it makes is cyclic.
    """
    tune_malloc()
    threads = torch.get_num_threads()
    serial = plan.device.type == "cpu" and (plan.method.is_elementwise(plan.hparams) or plan.tensor_workers(threads) > 1)
    collecting = gc.isenabled()
    if serial:
        torch.set_num_threads(1)
    gc.disable()
    try:
        with one_blas_thread(plan):
            yield threads
    finally:
        if collecting:
            gc.enable()
        if serial:
            torch.set_num_threads(threads)


def one_blas_thread(plan: MergePlan) -> Any:
    """NumPy's and SciPy's BLAS on one thread for CPU merges of ``tensor_parallel`` methods (the
    spectral methods' Gram products and eigensolvers), set here, before any worker starts: OpenBLAS
    did not apply a thread count set from a worker thread to that thread's calls (measured: a
    2000 x 2000 product in a worker still ran on 2 threads), and 2 BLAS threads per worker fight
    over the cores."""
    if plan.device.type != "cpu" or not plan.method.is_tensor_parallel(plan.hparams):
        return nullcontext()
    from mergelab.ops.lapack import single_threaded_blas

    return single_threaded_blas()
