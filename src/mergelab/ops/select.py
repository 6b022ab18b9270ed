"""Exact streaming order statistics: the k-th smallest value of a huge stream, in a few passes.

TIES' global top-k and PCB's model-wide quantiles need ``torch.kthvalue`` over the whole flattened
task vector (T rows of d elements, d = every parameter of the model). Holding that in memory is
what makes peers run out of RAM, so we select exactly with a radix histogram, 16 bits per pass:

* each value is mapped to an order-preserving integer key (32 bits for float32, 64 for float64);
* pass 0 counts the high 16 bits of every key (65,536 bins per row);
* the bin holding the k-th key is found from the cumulative counts;
* each further pass counts the next 16 bits of the keys that share the high bits found so far;
* after ``bits / 16`` passes (2 for float32, 4 for float64) the k-th key, and so the exact k-th
  value, is known.

Memory is two histograms per row and requested rank, whatever d is. The answer equals
``torch.kthvalue`` on the concatenated stream (a property test checks it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mergelab.ops import native

_BINS = 1 << 16
_CHUNK = 1 << 20  # elements per step: keeps temporaries in cache (measured 10x faster than whole tensors)
_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def _signed_key(values: torch.Tensor) -> torch.Tensor:
    """Order-preserving map float -> signed int of the same width (negative floats get their
    magnitude bits flipped)."""
    bits = values.contiguous().view(_INT[values.dtype])
    width = 8 * values.element_size()
    return bits ^ ((bits >> (width - 1)) & ((1 << (width - 1)) - 1))


def _key_to_float(key: int, dtype: torch.dtype) -> float:
    """Inverse of the key map for one signed key (a Python int, two's complement semantics)."""
    width = 8 * dtype.itemsize
    bits = key ^ ((key >> (width - 1)) & ((1 << (width - 1)) - 1))
    return float(torch.tensor([bits], dtype=_INT[dtype]).view(dtype).item())


def _chunks(row: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, row.numel(), _CHUNK):
        yield row[start : start + _CHUNK]


class _ThreadCounts:
    """Count arrays that each thread owns (the kernels add into them with no lock), made on a thread's first
    use by ``make``; :meth:`drain` hands them all to the owner to sum once the pass is over."""

    def __init__(self, make: Callable[[], Any]):
        self._make = make
        self._local = threading.local()
        self._lock = threading.Lock()
        self._made: list[Any] = []

    def mine(self) -> Any:
        counts = getattr(self._local, "counts", None)
        if counts is None:
            counts = self._local.counts = self._make()
            with self._lock:
                self._made.append(counts)
        return counts

    def drain(self) -> list[Any]:
        made, self._made = self._made, []
        return made


class StreamingKth:
    """Exact k-th smallest value per row over a stream of chunks, in ``n_passes`` passes.

    Args:
        n_rows: number of independent rows (e.g. one per task vector).
        nonnegative: every value is >= 0 (magnitudes): their bits are already ordered keys, which
            saves the sign flip and the bin offset on every element.
        dtype: the key width: ``torch.float32`` (default; other dtypes are rounded to it, 2 passes)
            or ``torch.float64`` (4 passes). ``None``: the dtype of the first chunk observed
            (float64 stays exact; anything else is selected as float32).

    Usage: call :meth:`observe` with every chunk ``(n_rows, ...)`` in pass 0, then
    :meth:`end_pass0` with the ranks wanted (1-based, per row); then for each further pass
    :meth:`observe` with the same chunks again, calling :meth:`end_pass` between passes; after the
    last pass, :meth:`values`.
    """

    def __init__(self, n_rows: int, nonnegative: bool = False, dtype: torch.dtype | None = torch.float32):
        self.n_rows = n_rows
        self.nonnegative = nonnegative
        self.dtype = dtype
        self.count = 0
        self._hist_hi = torch.zeros(n_rows, _BINS, dtype=torch.int64)
        self._targets: list[list[list[int]]] = []  # per row, per rank: [rank among the keys with the prefix, prefix]
        self._hist: list[dict[int, torch.Tensor]] = []  # per row: prefix -> histogram of the next 16 bits
        self._pass = 0
        self._lock = threading.Lock()
        self._counts = _ThreadCounts(lambda: torch.zeros(n_rows, _BINS // 2, dtype=torch.int64))  # the kernels' (pass 0)
        self._broken = False

    @property
    def n_passes(self) -> int:
        """Passes over the stream: 2 for float32 keys, 4 for float64 (2 until the first chunk if ``dtype=None``)."""
        return 4 if self.dtype == torch.float64 else 2

    @property
    def _bits(self) -> int:
        return 16 * self.n_passes

    def observe(self, chunk: torch.Tensor) -> None:
        """``chunk`` is ``(n_rows, ...)`` float on any device. Thread-safe: chunks of one pass may be
        observed from several threads at once (counts are added under a lock)."""
        if self.dtype is None:
            with self._lock:
                if self.dtype is None:
                    self.dtype = torch.float64 if chunk.dtype == torch.float64 else torch.float32
        rows = chunk.detach().reshape(self.n_rows, -1).to("cpu", self.dtype)
        top = self._bits - 16
        if self._pass == 0:
            counts = torch.zeros(self.n_rows, _BINS // 2 if self.nonnegative else _BINS, dtype=torch.int64)
            for row in range(self.n_rows):
                for part in _chunks(rows[row]):
                    high = self._key(part) >> top  # in [0, 32768) if nonnegative, else [-32768, 32768)
                    try:
                        counts[row] += torch.bincount(high if self.nonnegative else high + _BINS // 2, minlength=counts.shape[1])
                    except RuntimeError:  # a negative bin: the sign bit of a "nonnegative" value (-0.0 too)
                        raise ValueError("StreamingKth(nonnegative=True) got a negative value") from None
            with self._lock:
                self.count += rows.shape[1]
                self._hist_hi[:, -counts.shape[1] :] += counts
            return
        known = self._bits - 16 * self._pass  # the prefix holds the key's bits above this one
        found = []
        for row in range(self.n_rows):
            wanted = self._hist[row]
            for part in _chunks(rows[row]):
                key = self._key(part)
                prefix = key >> known
                for value, hist in wanted.items():
                    digit = (key[prefix == value] >> (known - 16)) & (_BINS - 1)
                    if digit.numel():
                        found.append((hist, torch.bincount(digit, minlength=_BINS)))
        with self._lock:
            for hist, count in found:
                hist.add_(count)

    def observe_abs_diff(self, base: torch.Tensor, models: list[torch.Tensor]) -> bool:
        """What ``observe(|models[t] - base|)`` does (row t: ``models[t]``), from the stored 1-D
        chunks, in compiled kernels (:mod:`mergelab.ops.native`); the differences are taken in
        float32, as the plain path does. Each thread counts into its own rows, added up at the end of
        the pass. Returns False where the kernels do not apply (not built, float64 keys, a storage
        dtype they do not take, several ranks in a row): then call :meth:`observe`. A difference
        that is Inf or NaN also returns False, after some of the chunk was counted: an error the
        caller must report (the selector is then unusable)."""
        kernels = native.kernels()
        if kernels is None or not native.takes(base, models) or not self.nonnegative:
            return False
        if self.dtype not in (None, torch.float32) or (self._pass > 0 and any(len(w) != 1 for w in self._hist)):
            return False
        if self._pass == 0:
            with self._lock:
                self.dtype = torch.float32
                self.count += base.numel()
            if not kernels.abs_diff_high_counts(base, models, self._counts.mine()):
                self._broken = True
                return False
            return True
        prefixes = torch.tensor([next(iter(wanted)) for wanted in self._hist], dtype=torch.int32)
        kernels.abs_diff_digit_counts(base, models, prefixes, self._counts.mine())
        return True

    def _fold(self) -> None:
        """Add the threads' count rows of the pass just ended to the histograms."""
        if self._broken:
            raise RuntimeError("StreamingKth saw an Inf or NaN; its counts are incomplete")
        for counts in self._counts.drain():
            if self._pass == 0:
                self._hist_hi[:, _BINS // 2 :] += counts
            else:
                for wanted, row in zip(self._hist, counts, strict=True):
                    next(iter(wanted.values())).add_(row)

    def _key(self, part: torch.Tensor) -> torch.Tensor:
        if not self.nonnegative:
            return _signed_key(part)
        return part.contiguous().view(_INT[part.dtype])  # negative values are refused by pass 0's bincount

    def high_bins(self, ranks: list[int]) -> list[list[int]]:
        """After pass 0 (before :meth:`end_pass0`), magnitudes: per row, the high 16 bits of the keys of
        the given ranks (clipped to 1..count) -- where a :class:`WindowCount` should look."""
        self._fold()
        cumulative = self._hist_hi.cumsum(dim=1)
        wanted = torch.tensor([min(max(k, 1), self.count) for k in ranks], dtype=torch.int64)
        return [[int(b) - _BINS // 2 for b in torch.searchsorted(cumulative[row], wanted)] for row in range(self.n_rows)]

    def end_pass0(self, ranks: list[list[int]]) -> None:
        """``ranks[row]`` lists the 1-based ranks wanted for that row (1 <= k <= count)."""
        self._fold()
        cumulative = self._hist_hi.cumsum(dim=1)
        for row, row_ranks in enumerate(ranks):
            targets: list[list[int]] = []
            for k in row_ranks:
                if not 1 <= k <= self.count:
                    raise ValueError(f"rank {k} outside 1..{self.count}")
                bin_index = int(torch.searchsorted(cumulative[row], k))
                below = int(cumulative[row, bin_index - 1]) if bin_index > 0 else 0
                targets.append([k - below, bin_index - _BINS // 2])  # the signed high 16 bits
            self._targets.append(targets)
        self._hist_hi = torch.zeros(0)  # release
        self._new_histograms()

    def end_pass(self) -> None:
        """Between two passes after the first: narrow every target by the 16 bits just counted."""
        self._refine()
        self._new_histograms()

    def _new_histograms(self) -> None:
        self._hist = [{prefix: torch.zeros(_BINS, dtype=torch.int64) for _, prefix in row} for row in self._targets]
        rows = self.n_rows  # not `self` in the lambda: a cycle would keep every finished selector until gc runs
        self._counts = _ThreadCounts(lambda: torch.zeros(rows, _BINS, dtype=torch.int64))  # the kernels' digits
        self._pass += 1

    def _refine(self) -> None:
        self._fold()
        for row, targets in enumerate(self._targets):
            for target in targets:
                rank, prefix = target
                cumulative = self._hist[row][prefix].cumsum(dim=0)
                digit = int(torch.searchsorted(cumulative, rank))
                below = int(cumulative[digit - 1]) if digit > 0 else 0
                target[:] = [rank - below, (prefix << 16) | digit]

    def values(self) -> list[list[float]]:
        """After the last pass: the k-th smallest value for every requested rank, per row."""
        if self._pass == self.n_passes - 1:
            self._refine()
            self._pass += 1
        if self._pass != self.n_passes or self.dtype is None:
            raise RuntimeError(f"values() before the last of {self.n_passes} passes")
        return [[_key_to_float(prefix, self.dtype) for _, prefix in targets] for targets in self._targets]


class WindowCount:
    """The exact k-th smallest float32 magnitude per row in *one* pass, if it falls in a window guessed
    beforehand (e.g. from a sample): the high 16 bits of its key in ``[lows[row], lows[row] + width)``.

    The pass counts, per row, the keys past the window (one comparison per value, vectorised) and the
    low 16 bits of the keys inside it (a few per cent of them): one read of the data instead of
    :class:`StreamingKth`'s two. :meth:`values` gives ``None`` for a row whose k-th key turned out not
    to be in its window; the caller then selects the usual way.
    """

    def __init__(self, lows: list[int], width: int):
        self.n_rows, self.width, self.count = len(lows), width, 0
        self.lows = torch.tensor(lows, dtype=torch.int32)
        self._above = torch.zeros(self.n_rows, dtype=torch.int64)
        self._fine = torch.zeros(self.n_rows, width, _BINS, dtype=torch.int64)
        self._lock = threading.Lock()
        rows = self.n_rows  # not `self` in the lambda (see StreamingKth._new_histograms)
        self._counts = _ThreadCounts(lambda: (torch.zeros(rows, dtype=torch.int64),
                                              torch.zeros(rows, width, _BINS, dtype=torch.int64)))  # the kernel's
        self._broken = False

    def observe(self, magnitudes: torch.Tensor) -> None:
        """``magnitudes``: ``(n_rows, ...)`` float32 values >= 0 (any device). Thread-safe."""
        rows = magnitudes.detach().reshape(self.n_rows, -1).to("cpu", torch.float32)
        above = torch.zeros(self.n_rows, dtype=torch.int64)
        inside = []
        for row in range(self.n_rows):
            for part in _chunks(rows[row]):
                key = part.contiguous().view(torch.int32)
                bin_ = (key >> 16) - int(self.lows[row])
                above[row] += int((bin_ >= self.width).sum())
                held = (bin_ >= 0) & (bin_ < self.width)
                inside.append((row, (bin_[held] * _BINS + (key[held] & (_BINS - 1))).long()))
        with self._lock:
            self.count += rows.shape[1]
            self._above += above
            for row, index in inside:
                self._fine[row].view(-1).index_put_((index,), torch.ones_like(index), accumulate=True)

    def observe_abs_diff(self, base: torch.Tensor, models: list[torch.Tensor]) -> bool:
        """:meth:`observe` of ``|models[t] - base|`` (float32) from the stored 1-D chunks, in a compiled kernel;
        False where it does not apply (then call :meth:`observe`) or on an Inf/NaN difference (after counting
        part of the chunk: an error the caller must report)."""
        kernels = native.kernels()
        if kernels is None or not native.takes(base, models):
            return False
        with self._lock:
            self.count += base.numel()
        finite = kernels.abs_diff_window_counts(base, models, self.lows, self.width, *self._counts.mine())
        self._broken |= not finite
        return finite

    def values(self, rank: int) -> list[float | None]:
        """After the pass: per row, the ``rank``-th smallest value (1-based), or ``None`` if it is not in the window."""
        if self._broken:
            raise RuntimeError("WindowCount saw an Inf or NaN; its counts are incomplete")
        for above, fine in self._counts.drain():
            self._above += above
            self._fine += fine
        found: list[float | None] = []
        for row in range(self.n_rows):
            cumulative = self._fine[row].view(-1).cumsum(dim=0)
            below = self.count - int(self._above[row]) - int(cumulative[-1])
            if not below < rank <= below + int(cumulative[-1]):
                found.append(None)
                continue
            index = int(torch.searchsorted(cumulative, rank - below))  # the first with cumulative >= rank - below
            key = ((int(self.lows[row]) + index // _BINS) << 16) | (index % _BINS)
            found.append(_key_to_float(key, torch.float32))
        return found
