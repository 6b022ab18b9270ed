"""The streaming merge engine: one tensor at a time, from every model, through the method.

For each tensor name (in the plan's order) the engine reads the base and every model's tensor,
forms the task vectors ``tau_t = model_t - base`` in the compute dtype on the compute device,
calls the method, adds the base back, casts to the base's dtype and hands the result to the
writer (or to the returned dict) before reading the next tensor. Peak memory is therefore about
``(models + 3)`` times the largest tensor plus one write buffer, whatever the number of tensors.

Methods with whole-model statistics get ``n_stat_passes`` extra streaming passes first.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager, nullcontext
from functools import partial
from itertools import count
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import torch

from mergelab.engine.plan import CHUNK_ELEMENTS_CPU, LOOKAHEAD_PER_WORKER, MergePlan
from mergelab.errors import MergelabError
from mergelab.io import sigbus
from mergelab.io.writer import CheckpointWriter, input_paths
from mergelab.methods.registry import TensorCtx
from mergelab.ops import native
from mergelab.ops.finite import all_finite
from mergelab.version import __version__


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


CHUNK_ELEMENTS = {"cpu": CHUNK_ELEMENTS_CPU, "cuda": 1 << 24}  # per task row; ~1 MB of float32 per row on CPU


Raw = tuple[torch.Tensor, list[torch.Tensor]]  # one tensor of the base and of every model, as stored


class Buffers:
    """Byte buffers reused from tensor to tensor, each grown to the largest request so far.

    A fresh buffer per tensor costs a page fault per 4 KB on every read (reading into fresh memory
    measured 3.6x slower than copying into a reused buffer); reused buffers are faulted in once."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}

    def get(self, slot: int, role: int, nbytes: int) -> torch.Tensor:
        buffer = self._buffers.get((slot, role))
        if buffer is None or buffer.numel() < nbytes:
            self._buffers[slot, role] = buffer = torch.empty(nbytes, dtype=torch.uint8)
        return buffer


def read_raw(plan: MergePlan, name: str, buffers: Buffers | None = None, slot: int = 0) -> Raw:
    """A tensor of the base and of every model. Inputs that are copied rather than mapped are read
    into ``buffers[slot]`` if given (the result then lives only until that slot is read into again)."""
    sources = [plan.base, *plan.models]
    raws = [
        source.get(name, buffers.get(slot, i, source.specs[name].nbytes) if buffers is not None and source.copies(name) else None)
        for i, source in enumerate(sources)
    ]
    return raws[0], raws[1:]


def prefetched(plan: MergePlan, names: list[str], buffers: Buffers | None = None) -> Generator[tuple[str, Raw], None, None]:
    """``(name, raw inputs)`` in order, the next tensor read (or, memory-mapped, read ahead) in a
    background thread while the caller computes (reads release the GIL): I/O overlaps
    compute, one tensor ahead at most. A yielded tensor stays valid until the caller asks for the
    next one: then its pages are released and, with ``buffers``, its buffer slot is reused."""
    pool = _worker("read")
    pending = pool.submit(read_raw, plan, names[0], buffers, 0) if names else None
    try:
        for index, name in enumerate(names):
            assert pending is not None
            raw = pending.result()
            if index + 1 < len(names):
                pending = pool.submit(read_raw, plan, names[index + 1], buffers, (index + 1) % 2)
            else:
                pending = None
            yield name, raw
            for source in (plan.base, *plan.models):  # the caller is done with it: free its pages
                source.release(name)
    finally:
        if pending is not None:
            pending.cancel() or pending.exception()  # never leave a read running past the caller


_WORKERS: dict[str, ThreadPoolExecutor] = {}


def _worker(role: str, threads: int = 1) -> ThreadPoolExecutor:
    """Long-lived threads per role (one unless asked): the allocator keeps reusing the same arenas
    (fresh threads per pass made glibc open new arenas and peak RSS grow by ~1 GB over a 3-pass
    TIES merge)."""
    key = role if threads == 1 else f"{role}-{threads}"
    if key not in _WORKERS:
        _WORKERS[key] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"mergelab-{key}")
    return _WORKERS[key]


def chunk_starts(plan: MergePlan, name: str) -> range:
    """Where the chunks of one tensor start: column chunks of the flattened tensor for
    elementwise methods (so the float32 temporaries never exceed a chunk), else one chunk."""
    numel = plan.base.specs[name].numel
    step = CHUNK_ELEMENTS[plan.device.type] if plan.method.is_elementwise(plan.hparams) else max(numel, 1)
    return range(0, max(numel, 1), step)


def raw_chunk(plan: MergePlan, raw: Raw, start: int) -> Raw:
    """The stored values (flat, in the storage dtypes) of the column chunk at ``start`` (the whole
    tensor for a method that is not elementwise)."""
    elementwise = plan.method.is_elementwise(plan.hparams)
    part = slice(start, start + CHUNK_ELEMENTS[plan.device.type]) if elementwise else slice(None)
    base_raw, model_raws = raw
    return base_raw.reshape(-1)[part], [stored.reshape(-1)[part] for stored in model_raws]


def load_chunk(plan: MergePlan, name: str, raw: Raw, start: int, check_finite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(taus, base)`` of the chunk at ``start`` in the compute dtype on the compute device:
    ``taus`` is ``(T, c)`` for a column chunk, ``(T, *shape)`` for a whole tensor. The storage-dtype
    inputs are converted here, a chunk at a time."""
    spec = plan.base.specs[name]
    elementwise = plan.method.is_elementwise(plan.hparams)
    shape: tuple[int, ...] = (-1,) if elementwise else spec.shape
    base_raw, model_raws = raw_chunk(plan, raw, start)
    base = base_raw.to(plan.device, plan.compute_dtype).reshape(shape)
    taus = torch.empty((plan.n_models, *base.shape), dtype=plan.compute_dtype, device=plan.device)
    for t, stored in enumerate(model_raws):
        taus[t].copy_(stored.reshape(shape))  # the storage dtype widened exactly
    taus -= base
    if check_finite and not all_finite(taus):  # a NaN/Inf in the base or any model reaches every tau it is in
        _raise_non_finite(plan, name, base, taus)
    return taus, base


def run_chunks(work: Callable[[int], None], starts: range, threads: int) -> None:
    """``work(start)`` for every chunk, on ``threads`` threads (this one and helpers) pulling the next
    chunk as each finishes -- so a thread slowed by the reader or writer takes fewer. The chunks
    must be independent; the first error stops the others and is raised here."""
    if threads < 2 or len(starts) < 2:
        for start in starts:
            work(start)
        return
    todo, lock, failed = iter(starts), threading.Lock(), threading.Event()

    def drain() -> None:
        while not failed.is_set():
            with lock:
                start = next(todo, None)
            if start is None:
                return
            try:
                work(start)
            except BaseException:
                failed.set()
                raise

    helpers = [_worker(f"compute-{i}").submit(drain) for i in range(1, threads)]
    try:
        drain()
    except BaseException:
        for helper in helpers:
            helper.exception()  # wait: no chunk runs on past this call
        raise
    for helper in helpers:
        error = helper.exception()
        if error is not None:
            raise error


def _raise_non_finite(plan: MergePlan, name: str, base: torch.Tensor, taus: torch.Tensor) -> None:
    """Name the first input (base, then models in order) whose values are not all finite."""
    if not bool(torch.isfinite(base).all()):
        raise MergelabError("contains NaN or Inf values", file=plan.base.file_of(name), tensor=name)
    for t in range(plan.n_models):
        if not bool(torch.isfinite(taus[t]).all()):
            raise MergelabError("contains NaN or Inf values", file=plan.models[t].file_of(name), tensor=name)


def execute(plan: MergePlan, *, progress: bool | None = None) -> dict[str, torch.Tensor] | Path:
    """Run a validated plan. Returns the merged state dict, or the output path if ``plan.out`` is set."""
    with _quiet_runtime(plan) as threads:
        return _execute(plan, progress, threads)


@contextmanager
def _quiet_runtime(plan: MergePlan) -> Iterator[int]:
    """The process settings a streaming merge runs best under, restored afterwards.

    * One torch intra-op thread for chunked (elementwise) CPU work: a ~1 MB chunk gains little
      from splitting, and every parallel op waits for its slowest thread -- on a machine where
      another process keeps a core busy, 2 threads made a merge 9-45x slower than 1 (measured,
      2 cores). Instead, independent chunks run on as many Python threads as torch had intra-op
      threads (yielded; :func:`run_chunks`), each taking the next chunk when done, so a thread
      held up by another process or by the reader/writer threads just takes fewer. Likewise the
      whole tensors of ``tensor_parallel`` methods (the SVD methods): several merged at once, one
      thread each (:func:`_merged_at_once`). Other whole-tensor methods keep torch's setting.
    * NumPy's and SciPy's BLAS on one thread for the SVD methods (:func:`_one_blas_thread`).
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
        with _one_blas_thread(plan):
            yield threads
    finally:
        if collecting:
            gc.enable()
        if serial:
            torch.set_num_threads(threads)


def _one_blas_thread(plan: MergePlan) -> Any:
    """NumPy's and SciPy's BLAS on one thread for CPU merges of ``tensor_parallel`` methods (the
    spectral methods' Gram products and eigensolvers), set here, before any worker starts: OpenBLAS
    did not apply a thread count set from a worker thread to that thread's calls (measured: a
    2000 x 2000 product in a worker still ran on 2 threads), and 2 BLAS threads per worker fight
    over the cores."""
    if plan.device.type != "cpu" or not plan.method.is_tensor_parallel(plan.hparams):
        return nullcontext()
    from mergelab.ops.lapack import single_threaded_blas

    return single_threaded_blas()


def _execute(plan: MergePlan, progress: bool | None, threads: int = 1) -> dict[str, torch.Tensor] | Path:
    show = _want_progress(progress)
    buffers = Buffers()  # read buffers, kept for every pass
    stats = _run_stat_passes(plan, show, buffers, threads)
    metadata = provenance(plan)
    notes: dict[str, dict[str, Any]] = {}  # what the method noted per tensor (ctx.notes), reported at the end
    writer = None
    if plan.out is not None:
        layout = [(n, plan.base.specs[n]) for n in plan.order]
        writer = CheckpointWriter(plan.out, layout, metadata, plan.max_shard_size, overwrite=plan.overwrite,
                                  inputs=input_paths([plan.base, *plan.models]))
    results: dict[str, torch.Tensor] = {}
    remaining = _group_sizes(plan.aliases)  # tied tensors: computed once, kept until all names are out
    kept: dict[str, torch.Tensor] = {}
    merged_names, copied_names = set(plan.merged), set(plan.copied)
    computed = list(dict.fromkeys(plan.aliases.get(n, n) for n in plan.order if plan.aliases.get(n, n) in merged_names))
    out = _worker("write")
    with writer if writer is not None else nullcontext(), sigbus.output_folder(writer.tmp if writer else None):
        workers = plan.tensor_workers(threads)
        if workers > 1:
            feed = _merged_at_once(plan, computed, stats, buffers, workers, notes)
        else:
            tied, slots, outputs = set(remaining), count(), Buffers()

            def into(name: str) -> torch.Tensor | None:
                """One of two output slots (one being written while the other is filled); a kept
                (tied) tensor needs its own memory."""
                if writer is None or name in tied:
                    return None
                return outputs.get(next(slots) % 2, 0, plan.base.specs[name].nbytes)

            feed = _merged_in_turn(plan, computed, stats, buffers, threads, into, notes)
        written: Future[None] | None = None
        with closing(feed), _bar(plan, show, f"merge ({plan.method.name})") as bar, _drain(lambda: written):
            for name in plan.order:
                canonical = plan.aliases.get(name, name)
                tensor = kept.pop(canonical, None)
                if tensor is None:
                    if name in copied_names:
                        tensor = plan.base.get(name).clone()
                    else:
                        fed, tensor = next(feed)  # computed after the previous write was waited for
                        assert fed == canonical
                if canonical in remaining:
                    remaining[canonical] -= 1
                    if remaining[canonical] > 0:
                        kept[canonical] = tensor
                if writer is not None:
                    _wait(written)  # one write in flight at most: bounded memory, errors surface here
                    written = out.submit(writer.write, name, tensor)
                else:
                    results[name] = tensor
                bar.update(plan.base.specs[name].nbytes)
        for name, values in _finalize(plan, stats).items():
            if writer is not None:
                writer.patch(name, *values)
            else:
                results[name].view(-1)[values[0]] = values[1]
        report = _rank_report(plan, notes)
        if writer is not None:
            if report is not None and RANK_KEY in metadata:
                writer.fill_metadata(RANK_KEY, _fitting(report[1]))
            path = writer.commit(extras_from=plan.base.folder)
            _warn(report)
            return path
    _warn(report)
    return {name: results[name] for name in plan.base.specs}  # the base's own key order


def _merged_in_turn(plan: MergePlan, names: list[str], stats: Any, buffers: Buffers, threads: int,
                    into: Callable[[str], torch.Tensor | None],
                    notes: dict[str, dict[str, Any]] | None = None) -> Generator[tuple[str, torch.Tensor], None, None]:
    """``(name, merged tensor)`` in order, one tensor at a time (its chunks on up to ``threads``
    threads), the next one's inputs read ahead; each merged into ``into(name)`` if not None."""
    feed = prefetched(plan, names, buffers)
    with closing(feed):
        for name, raw in feed:
            yield name, merge_tensor(plan, name, raw, stats, check_finite=plan.n_stat_passes == 0, into=into(name),
                                     threads=threads, notes=notes)


def _merged_at_once(plan: MergePlan, names: list[str], stats: Any, buffers: Buffers, workers: int,
                    notes: dict[str, dict[str, Any]] | None = None) -> Generator[tuple[str, torch.Tensor], None, None]:
    """``(name, merged tensor)`` in order, ``workers`` tensors read and merged at once, each on one
    thread (torch's intra-op threads are 1 here: :func:`_quiet_runtime`): for ``tensor_parallel``
    methods, whose LAPACK calls release the GIL. Up to ``LOOKAHEAD_PER_WORKER * workers`` tensors are
    started ahead of the one the caller waits for, so the workers move on past small tensors (a
    layer's biases, alternating with its matrices in name order) while a large one is merged. A
    running merge reads its tensor into its own buffer slot and releases its pages when done. On an
    error, or when the caller stops early, no merge runs on past this call."""
    check = plan.n_stat_passes == 0
    free_slots: SimpleQueue[int] = SimpleQueue()
    for slot in range(workers):
        free_slots.put(slot)

    def job(name: str) -> torch.Tensor:
        slot = free_slots.get()  # at most `workers` jobs run at once: one is always free
        try:
            raw = read_raw(plan, name, buffers, slot)
            try:
                return merge_tensor(plan, name, raw, stats, check_finite=check, notes=notes)
            finally:
                for source in (plan.base, *plan.models):
                    source.release(name)
        finally:
            free_slots.put(slot)

    pool, todo = _worker("tensors", workers), iter(names)
    started: deque[tuple[str, Future[torch.Tensor]]] = deque()
    try:
        while True:
            while len(started) < LOOKAHEAD_PER_WORKER * workers and (name := next(todo, None)) is not None:
                started.append((name, pool.submit(job, name)))
            if not started:
                return
            name, future = started.popleft()
            yield name, future.result()
    finally:
        for _, future in started:
            future.cancel() or future.exception()


def _wait(future: Future[None] | None) -> None:
    if future is not None:
        future.result()


@contextmanager
def _drain(current: Any) -> Iterator[None]:
    """On the way out -- error or not -- wait for the write in flight, so that the writer is never
    aborted under a running write; on success, its error (if any) is raised here."""
    try:
        yield
    except BaseException:
        future = current()
        if future is not None:
            future.exception()
        raise
    _wait(current())


def _finalize(plan: MergePlan, stats: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The method's late corrections, as merged values in the output dtype, for every tied name."""
    if plan.method.finalize is None:
        return {}
    names_of: dict[str, list[str]] = {}
    for name in plan.order:
        names_of.setdefault(plan.aliases.get(name, name), []).append(name)
    patches = {}
    for canonical, (index, delta) in plan.method.finalize(plan.hparams, stats).items():
        base = plan.base.get(canonical).reshape(-1)[index.cpu()].to(plan.compute_dtype)
        values = (base + delta.cpu().to(plan.compute_dtype)).to(plan.base.specs[canonical].dtype)
        check_output_range(plan, canonical, values)
        for name in names_of[canonical]:
            patches[name] = (index.cpu(), values)
    return patches


def merge_tensor(plan: MergePlan, name: str, raw: Raw, stats: Any, *, check_finite: bool,
                 into: torch.Tensor | None = None, threads: int = 1,
                 notes: dict[str, dict[str, Any]] | None = None) -> torch.Tensor:
    """Merge one tensor: the method's delta added to the base, in the base's dtype on CPU (a view
    of ``into``, a byte buffer, if given); independent chunks on up to ``threads`` threads. What the
    method notes about the tensor (``ctx.notes``) goes into ``notes[name]``."""
    spec = plan.base.specs[name]
    out = torch.empty(spec.numel, dtype=spec.dtype) if into is None else into[: spec.nbytes].view(spec.dtype)
    if spec.numel == 0:
        return out.reshape(spec.shape)

    fused = plan.method.fused if native.usable(plan.device, plan.compute_dtype) else None

    def merge_chunk(start: int) -> None:
        ctx = TensorCtx(name=name, stats=stats, seed=plan.seed, offset=start)
        if fused is not None:
            base_part, model_parts = raw_chunk(plan, raw, start)
            if fused(base_part, model_parts, out[start : start + base_part.numel()], ctx, **plan.hparams):
                return  # else (an input it does not take, or a NaN to report): the plain path below
        taus, base = load_chunk(plan, name, raw, start, check_finite)
        merged = base + plan.method.fn(taus, base, ctx, **plan.hparams)  # not in place: base may be the caller's
        if notes is not None and ctx.notes:
            notes[name] = ctx.notes
        if not all_finite(merged):
            raise MergelabError(f"method '{plan.method.name}' produced NaN or Inf (check its hyperparameters)", tensor=name)
        out[start : start + merged.numel()] = merged.reshape(-1)

    run_chunks(merge_chunk, chunk_starts(plan, name), _chunk_threads(plan, stats, threads))
    check_output_range(plan, name, out)
    return out.reshape(spec.shape)


def check_output_range(plan: MergePlan, name: str, values: torch.Tensor) -> None:
    """The merged values, cast to the output dtype, are finite: a cast out of the dtype's range
    (e.g. float16 past 65504) gives Inf, which is refused rather than written. The merge itself
    was checked finite before the cast, so a non-finite value here is an overflow."""
    if not all_finite(values):
        dtype = str(values.dtype).removeprefix("torch.")
        raise MergelabError(f"merged values overflow the output dtype {dtype} (largest finite "
                            f"{torch.finfo(values.dtype).max:g})",
                            file=str(plan.out) if plan.out is not None else None, tensor=name)


def _run_stat_passes(plan: MergePlan, show: bool, buffers: Buffers | None = None, threads: int = 1) -> Any:
    collector = plan.method.collector(plan.hparams, plan.n_models)
    if collector is None:
        return None
    chunk_threads = _chunk_threads(plan, collector, threads)
    index = 0
    while index < collector.n_passes:  # may grow once pass 0 has seen the data (float64 selection keys)
        with _bar(plan, show, f"statistics {index + 1}/{collector.n_passes}") as bar:
            for name, raw in prefetched(plan, plan.merged, buffers):
                observe = partial(_observe_chunk, plan, collector, index, name, raw)
                run_chunks(observe, chunk_starts(plan, name), chunk_threads)
                bar.update(plan.base.specs[name].nbytes)
        collector.end_pass(index)
        index += 1
    return collector.result()


def _observe_chunk(plan: MergePlan, collector: Any, index: int, name: str, raw: Raw, start: int) -> None:
    observe_raw = getattr(collector, "observe_raw", None) if _native_chunks(plan) else None
    if observe_raw is not None and observe_raw(index, name, *raw_chunk(plan, raw, start)):
        return
    # every pass checks (a sampling pass 0 may not see the whole of a chunk; the check is a sum)
    collector.observe(index, name, *load_chunk(plan, name, raw, start, check_finite=True))


def _native_chunks(plan: MergePlan) -> bool:
    """Whether a collector's compiled ``observe_raw`` may take this merge's column chunks (it declines,
    chunk by chunk, inputs it does not take)."""
    return plan.method.is_elementwise(plan.hparams) and native.usable(plan.device, plan.compute_dtype)


def _chunk_threads(plan: MergePlan, state: Any, threads: int) -> int:
    """Threads for a tensor's chunks: ``threads`` only where the chunks are independent --
    elementwise, on CPU, and the method's statistics or collector (``state``; ``None``: it has
    none) updated thread-safely (opted in with a ``thread_safe = True`` attribute) -- else 1."""
    safe = state is None or bool(getattr(state, "thread_safe", False))
    return threads if plan.device.type == "cpu" and plan.method.is_elementwise(plan.hparams) and safe else 1


def provenance(plan: MergePlan) -> dict[str, str]:
    """Safetensors metadata recording how the checkpoint was made. Methods that note the numerical
    rank of their matrices (``low_rank`` hyperparameter) get ``RANK_KEY`` reserved (blank), filled
    once the merge has seen every matrix (``CheckpointWriter.fill_metadata``, before the commit)."""
    inputs = [{"role": "base", "name": plan.base.label, "bytes": plan.base.nbytes}]
    inputs += [{"role": "model", "name": m.label, "bytes": m.nbytes} for m in plan.models]
    metadata = {
        "mergelab.version": __version__,
        "mergelab.method": plan.method.name,
        "mergelab.hparams": json.dumps(plan.hparams, sort_keys=True),
        "mergelab.compute_dtype": str(plan.compute_dtype).replace("torch.", ""),
        "mergelab.inputs": json.dumps(inputs),
    }
    if "low_rank" in plan.hparams:
        metadata[RANK_KEY] = " " * RANK_WIDTH
    return metadata


RANK_KEY, RANK_WIDTH = "mergelab.numerical_rank", 480  # reserved metadata value: ops.spectral.rank_report's JSON


def _rank_report(plan: MergePlan, notes: dict[str, dict[str, Any]]) -> tuple[str, str] | None:
    """The warning line and metadata value summing up the method's notes (``ops.spectral.rank_report``)."""
    from mergelab.ops.spectral import rank_report

    return rank_report(plan.method.name, notes, plan.hparams)


def _fitting(record: str) -> str:
    """The rank record, without its worst example if that would not fit the reservation (a long name)."""
    if len(json.dumps(record)) - 2 <= RANK_WIDTH:
        return record
    return json.dumps({k: v for k, v in json.loads(record).items() if k != "worst"}, separators=(",", ":"))


def _warn(report: tuple[str, str] | None) -> None:
    """One warning line summing up the method's notes, once the output is in place."""
    from mergelab.ops.spectral import LowRankWarning

    if report is not None and report[0]:
        warnings.warn(report[0], LowRankWarning, stacklevel=5)  # the caller of mergelab.merge


def _group_sizes(aliases: dict[str, str]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for canonical in aliases.values():
        sizes[canonical] = sizes.get(canonical, 1) + 1
    return sizes


def _want_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return sys.stderr.isatty()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *args: object) -> None:
        pass


def _bar(plan: MergePlan, show: bool, desc: str) -> Any:
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=plan.output_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)

