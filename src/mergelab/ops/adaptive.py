"""The merged model as an affine function of its coefficients, one tensor at a time (pure maths).

Every test-time-adaptation method writes a tensor of the merged model as::

    theta(lambda) = base + anchor + sum_t lambda[t] * delta[t]          (lambda: this tensor's group's row)

with ``anchor`` and the per-task ``delta`` computed once from the stacked task vectors ``taus = theta_t - base``
(``(T, *shape)``, float32) of that tensor:

============== ===================================== ============================================================
method         anchor                                delta[t]
============== ===================================== ============================================================
adamerging     0                                     ``tau_t`` (Yang et al., AdaMerging, ICLR 2024, Eq. 3 / 4)
adamerging_pp  0                                     ``tau_t`` trimmed to the top ``density`` magnitudes of the
                                                     whole task vector, then the entries agreeing with the
                                                     elected sign (official ``ties_merging_split``, "dis-sum")
cart_pp        ``mean_t tau_t`` (so base + anchor    ``SVD_k(tau_t - mean)`` for matrices, ``tau_t - mean``
               = theta_avg)                          otherwise (Choi et al., CART, arXiv:2412.12153, Eq. 6)
============== ===================================== ============================================================

So with every coefficient equal to ``c``: ``adamerging`` is ``task_arithmetic(scaling=c)``, ``adamerging_pp`` is
``ties(merge_func="sum", scaling=c)`` and ``cart_pp`` is ``cart(scaling=c)`` (the centred non-matrix vectors
sum to zero, leaving the average), up to float rounding. The maths is that of ``methods/ties.py`` (through
``ops/sparsify.py``) and ``methods/cart.py``, reused, not copied.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from mergelab.ops.sparsify import elect_sign, keep_mask_, keep_rank, kth_threshold
from mergelab.ops.spectral import kept_rank, low_rank, matrix_numerics


def task_vectors(taus: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """AdaMerging: no anchor, the task vectors themselves."""
    return None, taus


def ties_thresholds(flat_magnitudes: torch.Tensor, density: float, rule: str) -> torch.Tensor:
    """Per task, the smallest kept magnitude of its whole flattened task vector ``(T, N)`` (official
    ``topk_values_mask``: ``|tau| >= kthvalue(N - int(N * density))``; ``rule="exact"`` keeps exactly
    ``int(N * density)``). 0 keeps everything, inf nothing."""
    rank = keep_rank(flat_magnitudes.shape[1], density, rule)
    return kth_threshold(flat_magnitudes, rank).to(torch.float64)


def trimmed(taus: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``tau_t`` where ``|tau_t| >= thresholds[t]``, else 0, flattened to ``(T, n)``."""
    flat = taus.reshape(taus.shape[0], -1)
    return keep_mask_(flat.abs(), thresholds.to(flat.device, flat.dtype)).mul_(flat)


def sign_sum(taus: torch.Tensor, thresholds: torch.Tensor) -> float:
    """This tensor's share of the model-wide majority sign: the sum of its elected signs (official
    ``resolve_zero_signs`` takes ``sign(sum of sign(sum_t trimmed_t))`` over the whole flattened model)."""
    return float(torch.sign(trimmed(taus, thresholds).sum(dim=0)).sum())


def ties_selected(taus: torch.Tensor, thresholds: torch.Tensor, majority: float) -> tuple[None, torch.Tensor]:
    """AdaMerging++: each task's trimmed entries that agree with the elected sign (zero sums take the model-wide
    ``majority`` sign), official ``ties_merging_split`` / ``disjoint_merge_split``; summed, they are TIES "dis-sum"."""
    kept = trimmed(taus, thresholds)
    sign = elect_sign(kept, majority)
    agree = torch.where(sign > 0, kept > 0, kept < 0)
    return None, (kept * agree).reshape(taus.shape)


def majority_sign(total: float) -> float:
    """``sign(total)`` as the official code takes it (0 when the signs cancel exactly)."""
    return float(torch.sign(torch.tensor(float(total))))


def cart_components(
    name: str, taus: torch.Tensor, rank_ratio: float, exclude: Sequence[str], svd_dtype: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CART++: anchor ``mean_t tau_t`` (theta_avg - base) and the centred task vectors, rank-``k`` for matrices
    (``k`` as ``ops.spectral.kept_rank``; SVDs in ``svd_dtype`` as ``cart``), whole for other tensors as the official
    ``_get_truncated_task_vectors`` keeps them, all zero at ``rank_ratio=0`` as there."""
    origin = taus.mean(dim=0)
    numerics = matrix_numerics(name, taus.shape[1:], exclude, svd_dtype, taus.dtype)
    if numerics is None:
        if rank_ratio == 0.0:
            return origin, torch.zeros_like(taus)
        return origin, taus - origin
    k = kept_rank(min(taus.shape[1:]), rank_ratio)
    dtype, tol = numerics
    centre = origin.to(dtype)
    deltas = torch.stack([low_rank(tau.to(dtype) - centre, k, tol).to(taus.dtype) for tau in taus])
    return origin, deltas


def combine(anchor: torch.Tensor | None, deltas: torch.Tensor, coefficients: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``anchor + sum_t c_t * delta_t``: the merged task vector of one tensor (``mergelab merge``'s rebuild)."""
    coef = torch.as_tensor(coefficients, dtype=deltas.dtype, device=deltas.device)
    out: torch.Tensor = torch.tensordot(coef, deltas, dims=1)
    return out if anchor is None else anchor + out


def flat_magnitudes(taus: Iterable[torch.Tensor], n_tasks: int) -> torch.Tensor:
    """``(T, N)``: every tensor's ``|tau|`` side by side (the whole flattened task vectors, any order)."""
    parts = [t.reshape(n_tasks, -1).abs() for t in taus]
    return torch.cat(parts, dim=1) if parts else torch.zeros(n_tasks, 0)
