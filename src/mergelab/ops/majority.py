"""TIES' model-wide majority sign, voted during the merge pass.

The official TIES gives a parameter whose elected sign is 0 (``sum_t trimmed_t = 0``) the sign of the
sum of *every* elected sign of the model (``resolve_zero_signs(..., "majority")``). That sum is only
known once every tensor is merged, so each merged chunk returns a :class:`Vote` -- its elected signs'
sum and the (rare) parameters that wait for the majority, merged meanwhile with a provisional +1 -- and
the caller (the engine's merge pass, the continual merger) gathers the votes in a
:class:`MajorityVote`, whose :meth:`~MajorityVote.patches` re-merges the waiting parameters once the
pass is over, if the majority is not +1.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from mergelab.ops.pool import BlockPool
from mergelab.ops.sparsify import disjoint_merge

Patches = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (flat indices, merged task-vector values)


@dataclass(frozen=True)
class Vote:
    """One merged chunk's say: the sum of its elected signs (an integer, so the total is exact in any
    order), and the parameters waiting for the majority: their flat indices in the tensor and their
    trimmed entries ``(T, n)`` (``None``: none waits)."""

    signs: float
    waiting: torch.Tensor | None = None
    trimmed: torch.Tensor | None = None


def majority_merged(trimmed: torch.Tensor, sign_total: float, merge_func: str, scaling: float) -> torch.Tensor | None:
    """The deltas of parameters merged with a provisional +1 (``trimmed``: their ``(T, n)`` entries),
    re-merged with the majority sign ``sign(sign_total)``; ``None`` if that is +1 (they are right)."""
    majority = float(torch.sign(torch.tensor(float(sign_total))))
    if majority == 1.0:
        return None
    sign = torch.full((trimmed.shape[1],), majority, dtype=trimmed.dtype)
    return disjoint_merge(trimmed, sign, merge_func) * scaling


class MajorityVote:
    """The votes of a merge pass, gathered from any thread; the waiting parameters are kept off the heap
    (:class:`~mergelab.ops.pool.BlockPool`)."""

    def __init__(self, merge_func: str, scaling: float):
        self.merge_func, self.scaling = merge_func, scaling
        self.sign_total = 0.0
        self.pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, flat indices, trimmed entries)
        self.pool = BlockPool()
        self._lock = threading.Lock()

    def absorb(self, name: str, vote: Vote) -> None:
        with self._lock:
            self.sign_total += vote.signs
            if vote.waiting is not None and vote.trimmed is not None:
                self.pending.append((name, self.pool.keep(vote.waiting), self.pool.keep(vote.trimmed)))

    def patches(self) -> Patches:
        """The waiting parameters re-merged with the model-wide majority sign, if it is not +1."""
        grouped: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for name, index, trimmed in self.pending:  # one entry per tensor chunk
            delta = majority_merged(trimmed, self.sign_total, self.merge_func, self.scaling)
            if delta is None:
                return {}  # the provisional sign was right
            grouped.setdefault(name, []).append((index, delta))
        return {name: (torch.cat([i for i, _ in parts]), torch.cat([v for _, v in parts]))
                for name, parts in grouped.items()}
