"""Validate a whole merge from headers alone, before any tensor data is read, and describe it.

Everything that can be known up front is checked here: the method and its hyperparameters, every
model's keys, shapes and dtypes against the base, the output location and the device. The
resulting :class:`MergePlan` is what the engine executes and what ``mergelab plan`` prints.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import MergelabError
from mergelab.io.checks import check_models
from mergelab.io.placing import check_apart, check_output, input_paths
from mergelab.io.sources import TensorSource, open_source
from mergelab.io.writer import DEFAULT_SHARD_BYTES, Shard, plan_shards
from mergelab.methods.registry import Method, get_method
from mergelab.ops import native
from mergelab.ops.device import resolve_device

COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
PROCESS_BASELINE_BYTES = 400 * 2**20  # Python + torch, measured RSS after import (~0.35-0.4 GB)
MALLOC_TRIM_BYTES = 64 * 2**20  # runtime.tune_malloc's trim threshold: freed memory an allocator arena may keep
MALLOC_KEPT_BYTES = 3 * MALLOC_TRIM_BYTES  # x 3 threads (main, reader, writer)
CHUNK_ELEMENTS_CPU = 1 << 18  # chunks.CHUNK_ELEMENTS["cpu"]
LOOKAHEAD_PER_WORKER = 4  # tensor-parallel merges: tensors started ahead of the one awaited (stream._merged_at_once)

log = logging.getLogger(__name__)
_last_logged: list[str] = []  # the warnings of the previous plan built


@dataclass
class MergePlan:
    """A validated merge job. Built by :func:`build_plan`; executed by :func:`mergelab.engine.stream.execute`."""

    method: Method
    hparams: dict[str, Any]
    base: TensorSource
    models: list[TensorSource]
    order: list[str]  # every base tensor, in processing and output order
    merged: list[str]  # floating tensors computed by the method
    copied: list[str]  # integer/bool buffers copied from the base
    aliases: dict[str, str]  # tied tensors: name -> canonical name
    device: torch.device
    compute_dtype: torch.dtype
    out: Path | None = None
    shards: list[Shard] = field(default_factory=list)
    n_stat_passes: int = 0
    seed: int = 0
    max_shard_size: int = DEFAULT_SHARD_BYTES
    overwrite: bool = False
    warnings: list[str] = field(default_factory=list)  # a valid job that deserves a word: shown and logged

    @property
    def n_models(self) -> int:
        return len(self.models)

    @property
    def largest(self) -> int:
        return max((self.base.specs[n].numel for n in self.merged), default=0)

    @property
    def output_bytes(self) -> int:
        return sum(self.base.specs[n].nbytes for n in self.order)

    @property
    def input_bytes(self) -> int:
        return self.base.nbytes + sum(m.nbytes for m in self.models)

    def tensor_workers(self, threads: int | None = None) -> int:
        """How many tensors the engine merges at once: ``threads`` (default: torch's thread count) for a
        ``tensor_parallel`` method on CPU without statistics passes, as many as fit half the machine's
        memory; else 1."""
        threads = torch.get_num_threads() if threads is None else threads
        if (threads < 2 or self.device.type != "cpu" or self.n_stat_passes
                or self.method.is_elementwise(self.hparams) or not self.method.is_tensor_parallel(self.hparams)):
            return 1
        return max(1, min(threads, physical_memory() // 2 // max(1, self._tensor_bytes())))

    def _tensor_bytes(self) -> int:
        """Memory one whole-tensor merge of the largest tensor holds: its inputs, output and temporaries."""
        n, t = self.largest, self.n_models
        return n * (self._storage_itemsize() * (t + 2) + self.compute_dtype.itemsize * self._temporary_units())

    def _temporary_units(self) -> int:
        """Whole-tensor temporaries, in arrays of the largest tensor (compute dtype): base, taus (T) and ~3
        more unless the method says otherwise."""
        t = self.n_models
        return self.method.temporaries(self.hparams, t)

    def _storage_itemsize(self) -> int:
        return max((s.specs[x].dtype.itemsize for s in (self.base, *self.models) for x in self.merged), default=4)

    def peak_ram_bytes(self) -> int:
        """Estimated peak RSS: read and write buffers + compute temporaries + statistics + baseline."""
        n, t = self.largest, self.n_models
        compute = self.compute_dtype.itemsize
        storage = self._storage_itemsize()
        workers = self.tensor_workers()
        if workers > 1:  # each worker: its tensor's inputs, output and temporaries; outputs merged ahead
            # (LOOKAHEAD_PER_WORKER per worker) and one being written
            ahead = (LOOKAHEAD_PER_WORKER - 1) * workers + 1
            return PROCESS_BASELINE_BYTES + MALLOC_KEPT_BYTES + workers * (MALLOC_TRIM_BYTES + self._tensor_bytes()) \
                + ahead * n * storage + self._aliased_bytes()
        # the inputs (base + models) of this tensor and of the next one read ahead -- resident as mapped
        # page-cache pages, or as copies in reused buffers -- and two output slots (one filled while
        # the other is written)
        buffers = 2 * n * storage * (t + 1) + 2 * n * storage
        if self.device.type != "cpu":
            temporaries = 0
        elif self.method.is_elementwise(self.hparams):  # column chunks: base, taus (T) and ~4 temporaries
            temporaries = min(n, CHUNK_ELEMENTS_CPU) * compute * (t + 5)
        else:  # whole tensors
            temporaries = n * compute * self._temporary_units()
        stats = t * 2 * 65536 * 8 if self.n_stat_passes else 0
        return PROCESS_BASELINE_BYTES + MALLOC_KEPT_BYTES + buffers + temporaries + stats + self._aliased_bytes()

    def _aliased_bytes(self) -> int:
        """Tied tensors: each computed once and kept until all its names are written."""
        return sum(self.base.specs[c].nbytes for c in set(self.aliases.values()))

    def peak_gpu_bytes(self) -> int:
        if self.device.type != "cuda":
            return 0
        return self.largest * self.compute_dtype.itemsize * (self.n_models + 4)

    def close(self) -> None:
        """Release the open input files."""
        for source in (self.base, *self.models):
            source.close()

    def _kernels_note(self) -> str:
        """For methods with compiled kernels: whether this merge can use them (builds them on first use)."""
        if self.method.fused is None:
            return ""
        if not native.usable(self.device, self.compute_dtype) or self.n_models > native.MAX_MERGE_MODELS:
            return " (torch operations)"
        taken = sum(native.takes_dtypes(self.base.specs[n].dtype, [m.specs[n].dtype for m in self.models])
                    for n in self.merged)
        if taken == len(self.merged):
            return " (compiled kernels)"
        return f" (compiled kernels for {taken} of {len(self.merged)} tensors; torch for other storage dtypes)"

    def _workers_note(self) -> str:
        workers = self.tensor_workers()
        return f", {workers} tensors at once (one thread each)" if workers > 1 else ""

    def _shown_hparams(self) -> dict[str, Any]:
        """The hyperparameters as used, less the options left unset (``None``: e.g. cart's ``route``); a preset's
        values are filled in by then, so nothing the merge uses is hidden."""
        return {k: v for k, v in self.hparams.items() if v is not None}

    def summary(self) -> str:
        """The human-readable plan printed by ``--dry-run`` and ``mergelab plan``."""
        passes = self.n_stat_passes + 1
        lines = [
            f"method        {self.method.name}  {json.dumps(self._shown_hparams(), sort_keys=True)}",
            f"base          {self.base.label}",
            *[f"model {i + 1:<7} {m.label}" for i, m in enumerate(self.models)],
            f"tensors       {len(self.merged)} merged, {len(self.copied)} copied from base, {len(self.aliases)} tied",
            f"passes        {passes} over the inputs ({self.n_stat_passes} statistics + 1 merge)",
            f"input         {_size(self.input_bytes)} read per pass",
            f"compute       {str(self.compute_dtype).removeprefix('torch.')} on {self.device}{self._kernels_note()}"
            f"{self._workers_note()}",
            f"peak RAM      ~{_size(self.peak_ram_bytes())} (largest tensor {self.largest:,} elements)",
        ]
        if self.device.type == "cuda":
            lines.append(f"peak GPU      ~{_size(self.peak_gpu_bytes())}")
        if self.out is not None:
            lines.append(f"output        {self.out}: {_size(self.output_bytes)} in {len(self.shards)} shard(s)")
        else:
            lines.append(f"output        in memory: {_size(self.output_bytes)}")
        lines.extend(f"warning       {text}" for text in self.warnings)
        return "\n".join(lines)


def physical_memory() -> int:
    """The machine's RAM in bytes (16 GiB if the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{nbytes} B"


def build_plan(
    method: str,
    base: Any,
    models: list[Any],
    hparams: dict[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    max_shard_size: int = DEFAULT_SHARD_BYTES,
    require_device: bool = True,
) -> MergePlan:
    """Open every input lazily and validate the whole job; raises MergelabError on the first problem."""
    spec = get_method(method)
    if not isinstance(models, (list, tuple)) or not models:
        raise MergelabError("no models to merge: give at least one model besides the base")
    resolved = spec.resolve(hparams or {}, len(models))
    compute_dtype = _compute_dtype(dtype)
    target = resolve_device(device, require_device)
    if out is not None:
        check_output(Path(out), overwrite)
    if int(max_shard_size) <= 0:
        raise MergelabError(f"max_shard_size must be positive, got {max_shard_size}")
    base_src = open_source(base, "<base>")
    model_srcs = [open_source(m, f"<model {i + 1}>") for i, m in enumerate(models)]
    if out is not None:
        check_apart(Path(out), input_paths([base_src, *model_srcs]))
    merged, copied = check_models(base_src, model_srcs)
    aliases = base_src.aliases()
    order = sorted(base_src.specs, key=lambda n: (base_src.file_of(n), n))
    collector = spec.collector(resolved, len(models))
    plan = MergePlan(
        method=spec,
        hparams=resolved,
        base=base_src,
        models=model_srcs,
        order=order,
        merged=[n for n in order if n in merged and n not in aliases],
        copied=[n for n in order if n in copied],
        aliases=aliases,
        device=target,
        compute_dtype=compute_dtype,
        out=Path(out) if out is not None else None,
        n_stat_passes=_stat_passes(collector, compute_dtype),
        seed=int(resolved.get("seed", 0) or 0),
        max_shard_size=int(max_shard_size),
        overwrite=overwrite,
    )
    if out is not None:
        layout = [(n, base_src.specs[n]) for n in order]
        single = Path(out).name if Path(out).suffix == ".safetensors" else None
        plan.shards = plan_shards(layout, int(max_shard_size), single)
    plan.warnings = input_warnings(spec.name, [base, *models], [base_src, *model_srcs], plan.merged)
    if plan.warnings != _last_logged:  # not again for the same job: `mergelab merge` plans it twice (plan, merge)
        for text in plan.warnings:
            log.warning("warning: %s", text)
    _last_logged[:] = plan.warnings
    return plan


def input_warnings(method: str, given: list[Any], sources: list[TensorSource], merged: list[str]) -> list[str]:
    """What is valid but likely not meant, for ``sources`` = [base, *models] (``given``: as passed): the
    folders' notes (which weights of several were used), one model only, the same model twice (same
    path or object, or the same content by :meth:`TensorSource.fingerprint`), and models stored in
    another floating dtype than the base (the output keeps the base's)."""
    base, models = sources[0], sources[1:]
    names = ["the base", *(f"model {i}" for i in range(1, len(sources)))]
    notes = [text for source in sources for text in source.warnings]
    if len(models) == 1:
        notes.append(f"only one model ({models[0].label}): the result is the base plus its task vector as {method} "
                     "weighs it, not a merge of several models")
    firsts: dict[tuple[str, str], int] = {}  # an input's identity -> the first input with it
    prints: dict[int, bytes | None] = {}
    for i, (item, source) in enumerate(zip(given, sources, strict=True)):
        key = ("path", os.path.realpath(item)) if isinstance(item, (str, os.PathLike)) else ("object", str(id(item)))
        same = firsts.setdefault(key, i)
        how = "the same file as" if key[0] == "path" else "the same object as"
        if same == i:  # not the same path: the same content?
            how = "the same content as (same size, header and sampled bytes)"
            same = next((j for j in range(i) if sources[j].specs == source.specs
                         and _fingerprint(prints, j, sources[j]) is not None
                         and _fingerprint(prints, j, sources[j]) == _fingerprint(prints, i, source)), i)
        if same != i:
            effect = "its task vector is zero" if same == 0 else "it counts twice in the merge"
            notes.append(f"{names[i]} ({source.label}) is {how} {names[same]} ({sources[same].label}): {effect}")
    for i, model in enumerate(models, 1):
        differ = [n for n in merged if model.specs[n].dtype != base.specs[n].dtype]
        if differ:
            first = differ[0]
            theirs, ours = model.specs[first].dtype, base.specs[first].dtype
            loss = "; precision or range may be lost" if not _widens(theirs, ours) else ""
            notes.append(f"model {i} ({model.label}) stores {len(differ)} merged tensor(s) in another floating dtype "
                         f"than the base (e.g. '{first}': {_dtype(theirs)} vs the base's {_dtype(ours)}): the output "
                         f"keeps the base's dtypes{loss}")
    return notes


def _fingerprint(cache: dict[int, bytes | None], index: int, source: TensorSource) -> bytes | None:
    if index not in cache:
        cache[index] = source.fingerprint()
    return cache[index]


def _widens(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether every value of ``source`` is exactly a value of ``target``."""
    return source == target or target == torch.float64 or (target == torch.float32 and source.itemsize <= 2)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _stat_passes(collector: Any, dtype: torch.dtype) -> int:
    """Statistics passes before the merge pass; a collector whose count depends on the compute dtype
    (float64 selection keys take more radix passes) says so with ``passes_for(dtype)``."""
    if collector is None:
        return 0
    passes_for = getattr(collector, "passes_for", None)
    return int(passes_for(dtype)) if passes_for is not None else int(collector.n_passes)


def _compute_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in COMPUTE_DTYPES.values():
        return dtype
    if dtype in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[dtype]
    raise MergelabError(f"compute dtype must be float32 or float64, got {dtype!r}")
