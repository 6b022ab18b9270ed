"""The streaming merge engine: one tensor at a time, from every model, through the method.

For each tensor name (in the plan's order) the engine reads the base and every model's tensor,
forms the task vectors ``tau_t = model_t - base`` in the compute dtype on the compute device,
calls the method, adds the base back, casts to the base's dtype and hands the result to the
writer (or to the returned dict) before reading the next tensor. Peak memory is therefore about
``(models + 3)`` times the largest tensor plus one write buffer, whatever the number of tensors.

Methods with whole-model statistics get ``n_stat_passes`` extra streaming passes first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future
from contextlib import closing, contextmanager, nullcontext
from itertools import count
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import torch

from mergelab.engine.chunks import (
    Buffers,
    Raw,
    chunk_starts,
    load_chunk,
    prefetched,
    raw_chunk,
    read_raw,
    run_chunks,
    worker,
)
from mergelab.engine.passes import absorb_late, check_output_range, chunk_threads, late_patches, run_stat_passes
from mergelab.engine.plan import LOOKAHEAD_PER_WORKER, MergePlan
from mergelab.engine.progress import progress_bar, want_progress
from mergelab.engine.provenance import RANK_KEY, fitting, notes_report, provenance, warn_notes
from mergelab.engine.runtime import quiet_runtime
from mergelab.errors import MergelabError
from mergelab.io import sigbus
from mergelab.io.placing import input_paths
from mergelab.io.writer import CheckpointWriter
from mergelab.methods.registry import Late, TensorCtx
from mergelab.ops import native
from mergelab.ops.finite import all_finite


def execute(plan: MergePlan, *, progress: bool | None = None) -> dict[str, torch.Tensor] | Path:
    """Run a validated plan. Returns the merged state dict, or the output path if ``plan.out`` is set."""
    with quiet_runtime(plan) as threads:
        return _execute(plan, progress, threads)


def _execute(plan: MergePlan, progress: bool | None, threads: int = 1) -> dict[str, torch.Tensor] | Path:
    show = want_progress(progress)
    buffers = Buffers()  # read buffers, kept for every pass
    stats = run_stat_passes(plan, show, buffers, threads)
    late = plan.method.gatherer(plan.hparams, stats)  # what the merge pass leaves for the late patches
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
    out = worker("write")
    with writer if writer is not None else nullcontext(), sigbus.output_folder(writer.tmp if writer else None):
        workers = plan.tensor_workers(threads)
        if workers > 1:
            feed = _merged_at_once(plan, computed, stats, late, buffers, workers, notes)
        else:
            tied, slots, outputs = set(remaining), count(), Buffers()

            def into(name: str) -> torch.Tensor | None:
                """One of two output slots (one being written while the other is filled); a kept
                (tied) tensor needs its own memory."""
                if writer is None or name in tied:
                    return None
                return outputs.get(next(slots) % 2, 0, plan.base.specs[name].nbytes)

            feed = _merged_in_turn(plan, computed, stats, late, buffers, threads, into, notes)
        written: Future[None] | None = None
        with closing(feed), progress_bar(plan, show, f"merge ({plan.method.name})") as bar, _drain(lambda: written):
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
        for name, values in late_patches(plan, late).items():
            if writer is not None:
                writer.patch(name, *values)
            else:
                results[name].view(-1)[values[0]] = values[1]
        report = notes_report(plan, notes)
        if writer is not None:
            if report is not None and RANK_KEY in metadata:
                writer.fill_metadata(RANK_KEY, fitting(report[1]))
            path = writer.commit(extras_from=plan.base.folder)
            warn_notes(report)
            return path
    warn_notes(report)
    return {name: results[name] for name in plan.base.specs}  # the base's own key order


def _merged_in_turn(plan: MergePlan, names: list[str], stats: Any, late: Late | None, buffers: Buffers, threads: int,
                    into: Callable[[str], torch.Tensor | None],
                    notes: dict[str, dict[str, Any]] | None = None) -> Generator[tuple[str, torch.Tensor], None, None]:
    """``(name, merged tensor)`` in order, one tensor at a time (its chunks on up to ``threads``
    threads), the next one's inputs read ahead; each merged into ``into(name)`` if not None."""
    feed = prefetched(plan, names, buffers)
    with closing(feed):
        for name, raw in feed:
            yield name, merge_tensor(plan, name, raw, stats, check_finite=plan.n_stat_passes == 0, into=into(name),
                                     threads=threads, notes=notes, late=late)


def _merged_at_once(plan: MergePlan, names: list[str], stats: Any, late: Late | None, buffers: Buffers, workers: int,
                    notes: dict[str, dict[str, Any]] | None = None) -> Generator[tuple[str, torch.Tensor], None, None]:
    """``(name, merged tensor)`` in order, ``workers`` tensors read and merged at once, each on one
    thread (torch's intra-op threads are 1 here: :func:`quiet_runtime`): for ``tensor_parallel``
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
                return merge_tensor(plan, name, raw, stats, check_finite=check, notes=notes, late=late)
            finally:
                for source in (plan.base, *plan.models):
                    source.release(name)
        finally:
            free_slots.put(slot)

    pool, todo = worker("tensors", workers), iter(names)
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


def merge_tensor(plan: MergePlan, name: str, raw: Raw, stats: Any, *, check_finite: bool,
                 into: torch.Tensor | None = None, threads: int = 1,
                 notes: dict[str, dict[str, Any]] | None = None, late: Late | None = None) -> torch.Tensor:
    """Merge one tensor: the method's delta added to the base, in the base's dtype on CPU (a view
    of ``into``, a byte buffer, if given); independent chunks on up to ``threads`` threads. What the
    method notes about the tensor (``ctx.notes``) goes into ``notes[name]``, what it leaves for its late
    patches (``ctx.late``) into ``late``."""
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
                absorb_late(late, ctx)
                return  # else (an input it does not take, or a NaN to report): the plain path below
        taus, base = load_chunk(plan, name, raw, start, check_finite)
        merged = base + plan.method.fn(taus, base, ctx, **plan.hparams)  # not in place: base may be the caller's
        if notes is not None and ctx.notes:
            notes[name] = ctx.notes
        if not all_finite(merged):
            raise MergelabError(f"method '{plan.method.name}' produced NaN or Inf (check its hyperparameters)", tensor=name)
        absorb_late(late, ctx)
        out[start : start + merged.numel()] = merged.reshape(-1)

    run_chunks(merge_chunk, chunk_starts(plan, name), chunk_threads(plan, stats, threads))
    check_output_range(plan, name, out)
    return out.reshape(spec.shape)


def _group_sizes(aliases: dict[str, str]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for canonical in aliases.values():
        sizes[canonical] = sizes.get(canonical, 1) + 1
    return sizes


