"""Reading a merge's inputs and cutting them into chunks: tensors read ahead in a background thread into
reused buffers, column chunks of elementwise methods converted to the compute dtype a chunk at a time,
and independent chunks run on several threads (each pass of the engine uses these)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor

import torch

from mergelab.engine.plan import CHUNK_ELEMENTS_CPU, MergePlan
from mergelab.errors import MergelabError
from mergelab.ops.finite import all_finite

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
    pool = worker("read")
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


def worker(role: str, threads: int = 1) -> ThreadPoolExecutor:
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

    helpers = [worker(f"compute-{i}").submit(drain) for i in range(1, threads)]
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
