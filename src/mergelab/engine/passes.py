"""The passes around the merge pass: a method's statistics passes before it (``Method.stats``, the
collector re-read after each pass, its result handed to the method as ``ctx.stats``), and its late
corrections after it (``Method.late``: what each merged chunk left in ``ctx.late``, gathered during the
merge pass, turned into patches)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from mergelab.engine.chunks import Buffers, Raw, chunk_starts, load_chunk, prefetched, raw_chunk, run_chunks
from mergelab.engine.plan import MergePlan
from mergelab.engine.progress import progress_bar
from mergelab.errors import MergelabError
from mergelab.methods.registry import Late, TensorCtx
from mergelab.ops import native
from mergelab.ops.finite import all_finite


def run_stat_passes(plan: MergePlan, show: bool, buffers: Buffers | None = None, threads: int = 1) -> Any:
    collector = plan.method.collector(plan.hparams, plan.n_models)
    if collector is None:
        return None
    threads = chunk_threads(plan, collector, threads)
    index = 0
    while index < collector.n_passes:  # may grow once pass 0 has seen the data (float64 selection keys)
        with progress_bar(plan, show, f"statistics {index + 1}/{collector.n_passes}") as bar:
            for name, raw in prefetched(plan, plan.merged, buffers):
                observe = partial(_observe_chunk, plan, collector, index, name, raw)
                run_chunks(observe, chunk_starts(plan, name), threads)
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


def chunk_threads(plan: MergePlan, state: Any, threads: int) -> int:
    """Threads for a tensor's chunks: ``threads`` only where the chunks are independent --
    elementwise, on CPU, and the method's statistics or collector (``state``; ``None``: it has
    none) updated thread-safely (opted in with a ``thread_safe = True`` attribute) -- else 1."""
    safe = state is None or bool(getattr(state, "thread_safe", False))
    return threads if plan.device.type == "cpu" and plan.method.is_elementwise(plan.hparams) and safe else 1


def absorb_late(late: Late | None, ctx: TensorCtx) -> None:
    """What one merged chunk left for the method's late patches, gathered (chunks may run on several threads)."""
    if late is not None and ctx.late is not None:
        late.absorb(ctx.name, ctx.late)


def late_patches(plan: MergePlan, late: Late | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The method's late corrections, as merged values in the output dtype, for every tied name."""
    if late is None:
        return {}
    names_of: dict[str, list[str]] = {}
    for name in plan.order:
        names_of.setdefault(plan.aliases.get(name, name), []).append(name)
    patches = {}
    for canonical, (index, delta) in late.patches().items():
        base = plan.base.get(canonical).reshape(-1)[index.cpu()].to(plan.compute_dtype)
        values = (base + delta.cpu().to(plan.compute_dtype)).to(plan.base.specs[canonical].dtype)
        check_output_range(plan, canonical, values)
        for name in names_of[canonical]:
            patches[name] = (index.cpu(), values)
    return patches


def check_output_range(plan: MergePlan, name: str, values: torch.Tensor) -> None:
    """The merged values, cast to the output dtype, are finite: a cast out of the dtype's range
    (e.g. float16 past 65504) gives Inf, which is refused rather than written. The merge itself
    was checked finite before the cast, so a non-finite value here is an overflow."""
    if not all_finite(values):
        dtype = str(values.dtype).removeprefix("torch.")
        raise MergelabError(f"merged values overflow the output dtype {dtype} (largest finite "
                            f"{torch.finfo(values.dtype).max:g})",
                            file=str(plan.out) if plan.out is not None else None, tensor=name)
