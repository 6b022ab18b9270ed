"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023, arXiv:2306.01708).

Algorithm 1: trim each task vector to its top-``density`` magnitudes, elect a sign per parameter
by mass (``sign(sum_t trimmed_t)``), take the disjoint mean of the entries agreeing with it, and
add ``scaling`` times the result: ``theta = theta_0 + scaling * disjoint_merge(trim(tau))``.

Follows the official code (prateeky2806/ties-merging, src/utils/merge_utils.py: ``topk_values_mask``,
``resolve_sign``, ``resolve_zero_signs``, ``disjoint_merge``), which FusionBench ports unchanged:

* ``scope="global"`` (default, official/FusionBench): the top-k is taken over the *whole flattened*
  task vector of each model, and parameters whose elected sign is 0 get the model-wide majority
  sign. Both are exact without holding the flattened vectors: the thresholds by a two-pass
  streaming radix selection (``ops.select``; with the compiled kernels, a 1/32 sample pass and
  one window-count pass, see :class:`TiesGlobalStats`), the majority sign summed during the merge
  pass with the (rare) parameters that depend on it patched afterwards -- 3 reads of the inputs in
  all (2 and a sample with the kernels). ``scope="tensor"`` applies the same algorithm per tensor (mergekit's choice).
* ``threshold="official"`` (default) keeps ``|tau| >= kthvalue(d - int(d * density))``, i.e. one
  entry more than an exact top-k; ``threshold="exact"`` keeps exactly ``int(d * density)``.
* ``merge_func``: ``"mean"`` (disjoint mean, the paper), ``"sum"`` (FusionBench default), ``"max"``.

Defaults ``density=0.2, scaling=1.0, merge_func="mean"``: the paper's setting without validation
data (top-20 %, lambda = 1; Sec. 6 and App. C.4). FusionBench instead uses ``merge_func="sum",
scaling=0.3`` (config/method/ties_merging.yaml); pass those to reproduce it.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mergelab.methods.registry import TensorCtx, register
from mergelab.ops import native
from mergelab.ops.pool import BlockPool
from mergelab.ops.select import StreamingKth, WindowCount
from mergelab.ops.sparsify import disjoint_merge, elect_sign, keep_mask_, keep_rank, kth_threshold


@dataclass
class TiesStats:
    """Model-wide TIES quantities. ``thresholds`` come from the statistics passes; the majority
    sign is summed up *during* the merge pass (``sign_total``), and the rare parameters whose
    elected sign is 0 while some trimmed entry is not (exact cancellation) are merged with a
    provisional +1 and kept in ``pending`` until :func:`majority_patches` knows the real majority."""

    thresholds: torch.Tensor  # (T,) smallest kept magnitude per task vector

    @functools.cached_property
    def float32_thresholds(self) -> torch.Tensor:
        """The thresholds as the float32 merge compares them (converted once, not per chunk)."""
        return self.thresholds.to(torch.float32)
    sign_total: float = 0.0
    pending: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    pool: BlockPool = field(default_factory=BlockPool)  # holds the pending tensors off the heap
    lock: threading.Lock = field(default_factory=threading.Lock)  # chunks may be merged on several threads
    thread_safe: ClassVar[bool] = True  # the engine may run the merge pass's chunks in parallel


class TiesGlobalStats:
    """The exact per-task magnitude threshold; no pass if all is kept. Chunks may be observed from several threads.

    Torch path: ``StreamingKth``, passes 0-1 in float32 (0-3 in float64). Compiled-kernel path
    (float32; chosen when pass 0's first chunk reaches :meth:`observe_raw`): pass 0 reads a sample,
    the first 1/32 of every chunk, to guess each threshold's high 16 bits; pass 1 counts the keys past a
    window of bins around each guess and the low bits of those inside it (``WindowCount``). When every
    threshold falls in its window -- checked, not assumed -- that is the exact answer after one full
    read of the inputs instead of two (each read costs about the same; measured 1.92 s vs 2.07 s for
    the whole merge); otherwise the two ``StreamingKth`` passes follow (4 in all)."""

    thread_safe = True

    def __init__(self, hp: dict[str, Any], n_models: int):
        self.density, self.rule, self.n_models = hp["density"], hp["threshold"], n_models
        self.selector = StreamingKth(n_models, nonnegative=True, dtype=None)  # float64 taus get float64 keys
        self.keep_all = hp["density"] >= 1.0 and self.rule == "official"
        self.thresholds = torch.zeros(n_models)
        self.rank = 0
        self.selecting = False  # known after the selector's pass 0
        self.mode: str | None = None  # "sample" (kernels, window) or "plain", decided by pass 0's first chunk
        self.sampler: StreamingKth | None = None
        self.window: WindowCount | None = None
        self.offset = 0  # the pass that is the selector's pass 0 (0 on the plain path; 1 or 2 after sampling)
        self.finished_after: int | None = None  # the last pass, once the thresholds are known
        self._lock = threading.Lock()

    @property
    def n_passes(self) -> int:
        """Known as the passes go (4 for float64 keys; on the kernel path 2, 4 if a window misses): the
        engine re-reads it after each pass."""
        if self.keep_all:
            return 0
        if self.finished_after is not None:
            return self.finished_after + 1
        if self.mode == "sample" and self.offset == 0:
            return 2
        return self.offset + self.selector.n_passes

    def passes_for(self, dtype: torch.dtype) -> int:
        """Statistics passes a merge in compute ``dtype`` takes (for the plan, before any data is read): 2 in
        float32 (on the kernel path a sample pass and the window count; 4 if a guess misses), 4 in float64."""
        return 0 if self.keep_all else StreamingKth(1, dtype=dtype).n_passes

    def observe(self, index: int, name: str, taus: torch.Tensor, base: torch.Tensor) -> None:
        if index == 0:
            self._decide(kernels=False)
        magnitudes = taus.reshape(self.n_models, -1).abs()
        stage = self._stage(index)
        if stage == "sample":
            assert self.sampler is not None
            self.sampler.observe(magnitudes[:, : _sample_size(magnitudes.shape[1])])
        elif stage == "window":
            assert self.window is not None
            self.window.observe(magnitudes)
        elif self._selector_reads(index):
            self.selector.observe(magnitudes)

    def observe_raw(self, index: int, name: str, base: torch.Tensor, models: list[torch.Tensor]) -> bool:
        """The compiled form of :meth:`observe` on one chunk's stored values (False: not taken)."""
        if index == 0:
            self._decide(kernels=True)
        stage = self._stage(index)
        if stage == "sample":
            assert self.sampler is not None
            size = _sample_size(base.numel())
            return self.sampler.observe_abs_diff(base[:size], [m[:size] for m in models])
        if stage == "window":
            assert self.window is not None
            return self.window.observe_abs_diff(base, models)
        return not self._selector_reads(index) or self.selector.observe_abs_diff(base, models)

    def _stage(self, index: int) -> str:
        """What pass ``index`` feeds: the sample, the window count, or the selector."""
        if self.mode == "sample" and index == 0:
            return "sample"
        if self.mode == "sample" and index == 1 and self.offset == 0:
            return "window"
        return "select"

    def _selector_reads(self, index: int) -> bool:
        """Whether the selector needs pass ``index`` (its first pass always; later ones while selecting)."""
        return index == self.offset or (self.selecting and self.finished_after is None)

    def _decide(self, kernels: bool) -> None:
        with self._lock:
            if self.mode is None:
                self.mode = "sample" if kernels else "plain"
                if kernels:
                    self.sampler = StreamingKth(self.n_models, nonnegative=True, dtype=torch.float32)

    def end_pass(self, index: int) -> None:
        if self.finished_after is not None:
            return  # a caller that planned more passes than needed (they observed nothing)
        if self.mode == "sample" and self.offset == 0:
            if index == 0:
                self.window = self._guess_window()
                if self.window is None:
                    self.offset = 1  # nothing to guess from: the selector's passes come next
                return
            assert self.window is not None
            if self._decide_rank(self.window.count, index):
                return
            values = self.window.values(self.rank)
            if all(v is not None for v in values):
                self.thresholds = torch.tensor(values, dtype=torch.float64)
                self.finished_after = index
                return
            self.offset = 2  # a guess missed: the selector's two passes follow
            return
        selector_index = index - self.offset
        if selector_index == 0:
            if self._decide_rank(self.selector.count, index):
                return
            self.selector.end_pass0([[self.rank]] * self.n_models)
        elif selector_index < self.selector.n_passes - 1:
            self.selector.end_pass()
        else:
            self.thresholds = torch.tensor([row[0] for row in self.selector.values()], dtype=torch.float64)
            self.finished_after = index

    def _decide_rank(self, count: int, index: int) -> bool:
        """The rank of the threshold among ``count`` magnitudes; True (and the thresholds set) if there is
        nothing to select: rank 0 keeps all (thresholds 0), rank count + 1 keeps none (inf)."""
        self.rank = keep_rank(count, self.density, self.rule)
        self.selecting = 1 <= self.rank <= count
        if self.selecting:
            return False
        if self.rank > count:
            self.thresholds = torch.full((self.n_models,), float("inf"))
        self.finished_after = index
        return True

    def _guess_window(self) -> WindowCount | None:
        """From the sample: a window of high bins per task around its threshold's guess, wide enough for
        the sample's uncertainty (4 standard deviations of a quantile estimate, plus 0.1 %), at most
        ``_WINDOW_BINS`` bins; ``None`` if the sample is empty or selects nothing."""
        assert self.sampler is not None
        n = self.sampler.count
        rank = keep_rank(n, self.density, self.rule)
        if n == 0 or not 1 <= rank <= n:
            return None
        q = rank / n
        spread = int(n * (4 * math.sqrt(q * (1 - q) / n) + 1e-3)) + 1
        bins = self.sampler.high_bins([rank - spread, rank, rank + spread])  # per task: [low, guess, high]
        lows = [low if high - low < _WINDOW_BINS else max(guess - 1, 0) for low, guess, high in bins]
        width = max(min(high, low + _WINDOW_BINS - 1) - low + 1 for low, (_, _, high) in zip(lows, bins, strict=True))
        return WindowCount(lows, width)

    def result(self) -> TiesStats:
        return TiesStats(self.thresholds)


_SAMPLE_FRACTION = 32  # the sample pass reads the first 1/32 of every chunk
_WINDOW_BINS = 4  # at most 4 high bins in a window (2 MB of counts per task and thread)


def _sample_size(n: int) -> int:
    return -(-n // _SAMPLE_FRACTION)


def _majority_merged(trimmed: torch.Tensor, sign_total: float, merge_func: str, scaling: float) -> torch.Tensor | None:
    """The deltas of parameters merged with a provisional +1 (``trimmed``: their ``(T, n)`` entries),
    re-merged with the majority sign ``sign(sign_total)``; ``None`` if that is +1 (they are right)."""
    majority = float(torch.sign(torch.tensor(float(sign_total))))
    if majority == 1.0:
        return None
    sign = torch.full((trimmed.shape[1],), majority, dtype=trimmed.dtype)
    return disjoint_merge(trimmed, sign, merge_func) * scaling


def majority_patches(hp: dict[str, Any], stats: TiesStats | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Re-merge the pending parameters with the model-wide majority sign, if it is not +1."""
    if stats is None:
        return {}
    grouped: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, index, trimmed in stats.pending:  # one entry per tensor chunk
        delta = _majority_merged(trimmed, stats.sign_total, hp["merge_func"], hp["scaling"])
        if delta is None:
            return {}  # the provisional sign was right
        grouped.setdefault(name, []).append((index, delta))
    return {name: (torch.cat([i for i, _ in parts]), torch.cat([v for _, v in parts])) for name, parts in grouped.items()}


def _fused(base: torch.Tensor, models: list[torch.Tensor], out: torch.Tensor, ctx: TensorCtx, *,
           density: float, scaling: float, merge_func: str, scope: str, threshold: str) -> bool:
    """TIES in compiled loops (``native.Kernels``): a column chunk (global scope) or a whole tensor
    (per-tensor scope, thresholds selected here first), the same arithmetic as :func:`ties` below
    (``ops/native.py``: up to summation order). False (the plain :func:`ties`) for inputs the
    kernels do not take or an Inf/NaN to report."""
    kernels = native.kernels()
    if kernels is None or len(models) > native.MAX_MERGE_MODELS or not native.takes(base, models):
        return False
    if scope == "tensor":
        return _fused_tensor(kernels, base, models, out, density, scaling, merge_func, threshold)
    stats: TiesStats = ctx.stats
    finite, signs, waiting, trimmed = kernels.ties_merge(base, models, stats.float32_thresholds, scaling, merge_func, out)
    if not finite:
        return False
    with stats.lock:
        stats.sign_total += signs
        if waiting.numel():  # the parameters whose elected sign waits for the model-wide majority
            stats.pending.append((ctx.name, stats.pool.keep(waiting + ctx.offset), stats.pool.keep(trimmed)))
    return True


def _fused_tensor(kernels: native.Kernels, base: torch.Tensor, models: list[torch.Tensor], out: torch.Tensor,
                  density: float, scaling: float, merge_func: str, rule: str) -> bool:
    """Per-tensor TIES on one whole (flattened) tensor: its thresholds by the radix selection's kernels
    (two passes over the tensor), the merge by ``ties_merge``; the parameters whose sign sum is 0 get
    this tensor's majority sign (``elect_sign``) at the end, when it is known."""
    n = base.numel()
    rank = keep_rank(n, density, rule)
    if rank <= 0:
        thresholds = torch.zeros(len(models))
    elif rank > n:
        thresholds = torch.full((len(models),), float("inf"))
    else:
        selector = StreamingKth(len(models), nonnegative=True, dtype=torch.float32)
        if not selector.observe_abs_diff(base, models):
            return False  # an Inf/NaN: the plain path reports it
        selector.end_pass0([[rank]] * len(models))
        selector.observe_abs_diff(base, models)
        thresholds = torch.tensor([row[0] for row in selector.values()], dtype=torch.float32)
    finite, signs, waiting, trimmed = kernels.ties_merge(base, models, thresholds, scaling, merge_func, out)
    if not finite:
        return False
    delta = _majority_merged(trimmed, signs, merge_func, scaling) if waiting.numel() else None
    if delta is not None:  # this tensor's majority sign is not the provisional +1
        out[waiting] = (base[waiting].to(torch.float32) + delta).to(out.dtype)
    return True


def _check(hp: dict[str, Any], n_models: int) -> None:
    if not 0.0 <= hp["density"] <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {hp['density']}")


def _stats(hp: dict[str, Any], n_models: int) -> TiesGlobalStats | None:
    """Global scope: the k-th magnitude of each whole task vector, exactly, in two streaming passes
    (the first a 1/32 sample on the compiled-kernel path)."""
    return TiesGlobalStats(hp, n_models) if hp["scope"] == "global" else None


@register(
    "ties",
    defaults={"density": 0.2, "scaling": 1.0, "merge_func": "mean", "scope": "global", "threshold": "official"},
    choices={"merge_func": ("mean", "sum", "max"), "scope": ("global", "tensor"), "threshold": ("official", "exact")},
    summary="trim to top-density magnitudes, elect signs, disjoint mean",
    source="Yadav et al. NeurIPS 2023 Alg. 1; official prateeky2806/ties-merging merge_utils.py; "
    "defaults density 0.2, scaling 1.0, mean (paper, no-validation setting)",
    check=_check,
    stats=_stats,
    finalize=majority_patches,
    linear_in_scaling=True,
    elementwise=lambda hp: hp["scope"] == "global",
    # scope="tensor" (global is elementwise, so this count is not used for it): two more (T, n) arrays than
    # the generic T + 4 (|taus| and kthvalue's working copy); fitted to the benchmark set: 2,840 MB measured,
    # 2,092 MB with the generic count (benchmarks/README.md)
    temporaries=lambda hp, t: 3 * t + 4,
    fused=_fused,
)
def ties(
    taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, *,
    density: float, scaling: float, merge_func: str, scope: str, threshold: str,
) -> torch.Tensor:
    flat = taus.reshape(taus.shape[0], -1)  # (T, n)
    if scope == "tensor":
        magnitudes = flat.abs()
        thresholds = kth_threshold(magnitudes, keep_rank(flat.shape[1], density, threshold))
        trimmed = keep_mask_(magnitudes, thresholds).mul_(flat)  # in place: one (T, n) temporary
        sign = elect_sign(trimmed)
    else:
        stats: TiesStats = ctx.stats
        trimmed = keep_mask_(flat.abs(), stats.thresholds.to(flat.device, flat.dtype)).mul_(flat)
        sign = trimmed.sum(dim=0).sign_()
        signs = float(sign.sum())  # an integer: the total is exact, in any order of chunks
        # provisional majority +1 where the sum is 0 (adding the bool mask: a scalar torch.where was
        # 15 % of the merge); those with a non-zero entry wait for the real one
        # (a zero sum of non-zero entries has a positive one, so they are the zero sums with an agreeing entry)
        zero = sign == 0
        sign.add_(zero)
        agree = (trimmed * sign).gt_(0)  # (T, n) float mask: agrees with the elected sign
        count = agree.sum(dim=0)
        if merge_func == "mean":
            merged = agree.mul_(trimmed).sum(dim=0).div_(count.clamp(min=1))
        else:
            merged = disjoint_merge(trimmed, sign, merge_func)
        pending = zero.logical_and_(count > 0)
        ambiguous = torch.nonzero(pending).reshape(-1) if bool(pending.any()) else None  # rare: skip the scan otherwise
        with stats.lock:
            stats.sign_total += signs
            if ambiguous is not None:
                index, values = ambiguous.cpu() + ctx.offset, trimmed[:, ambiguous].cpu()
                stats.pending.append((ctx.name, stats.pool.keep(index), stats.pool.keep(values)))
        return merged.mul_(scaling).reshape(base.shape)
    return (disjoint_merge(trimmed, sign, merge_func) * scaling).reshape(base.shape)
