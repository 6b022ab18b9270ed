"""OPCM: Orthogonal Projection-based Continual Merging (Tang et al., "Merging Models on the Fly
Without Retraining: A Sequential Approach to Scalable Continual Model Merging", arXiv:2501.09522),
per-tensor maths.

Eq. (6)/(9): a new task vector ``tau_t`` of a weight matrix is projected away from the dominant
singular subspace of the current merged task vector ``tau_merged = U S V^T``, then added, and the
whole merged task vector is rescaled (Eq. 10) so that its norm equals the average norm of the task
vectors seen so far: ``lambda_t = ||lambda_{t-1} tau_merged + P(tau_t)|| / mean_i ||tau_i||``.

Following the official code (tanganke/opcm, FusionBench ``fusion_bench/method/opcm/opcm.py``,
``merge_linear_weights``) by default:

* ``projection="official"``: in the full singular bases of ``tau_merged``, the projected matrix
  ``P = U^T tau_t V`` has its *whole diagonal* zeroed and its top-left ``r x r`` block zeroed, with
  ``r = argmax(cumsum(S) / sum(S) > alpha)`` (the first index whose cumulative ratio passes alpha,
  0-based: the crossing direction itself is not in the block). ``projection="paper"`` zeroes only
  the top-left block with the paper's ``r`` = the minimal rank whose cumulative ratio reaches
  ``alpha`` (Eq. 9), i.e. one more direction and no diagonal.
* We never form the full ``U``/``V``: zeroing entries of ``P`` removes
  ``U_r (U_r^T tau V_r) V_r^T + sum_{i >= r} P_ii u_i v_i^T`` from ``tau``, which needs only the
  reduced SVD and equals the official full-matrix computation (a test checks it).
* ``non_matrix="official"``: other tensors (biases, norms, and here any tensor that is not 2-D)
  are added and rescaled with the same global ``lambda_t``, as the official code does (the paper's
  Eq. 8). ``non_matrix="average"``: the paper's prose ("averaged directly"): a running mean of their
  task vectors, left out of the rescaling.

Unlike the official code, which walks ``named_modules()`` and misses parameters that do not live
in leaf modules (e.g. CLIP's ``class_embedding``), every floating tensor is handled; following
the contract, every 2-D floating tensor is a matrix (use ``exclude`` patterns to treat some as
non-matrices, e.g. ``["*embed*"]`` to reproduce the official nn.Linear-only setting).

Departure, ``low_rank="auto"`` (default; ``"official"`` keeps the official rule everywhere): the
official diagonal runs over every singular pair of ``tau_merged``, including those of (numerically)
zero singular values, whose vectors are an arbitrary basis of the null spaces. After a LoRA-derived
(low-rank) model the merged vector is rank-deficient, and a 1e-7 change of it moved the next projection
by 14-18 % of the new task vector's largest entry. ``"auto"`` leaves out the pairs with
``s_i <= rank_tol * s_1`` (``rank_tol=1e-5``, as ``tsv``/``iso_c``); with none of those (full-rank merged
vectors) the computation is the official one, bit for bit. ``projection="paper"`` never touches them.
States saved before this option existed keep ``"official"``.

``lambda_t="adaptive"`` (default) is Eq. (10); ``lambda_t="sqrt"`` is the paper's alternative
``lambda_t = sqrt(t)`` (Sec. 4, after Eq. 10: task vectors are nearly orthogonal, so the norm of a sum of
``t`` of them grows as ``sqrt(t)``; Fig. 7 shows the adaptive factor following that curve). Either way
the state is the same running sum ``lambda_{t-1} tau_merged_{t-1} + P(tau_t)`` (Eq. 6 times
``lambda_t``); only the read-out divides by a different ``lambda_t``. :func:`adaptive_lambda` gives
Eq. (10)'s value from the merger's scalars (recorded per step by experiments, ``step_record``: Fig. 7's curve).

Default ``alpha=0.5``: FusionBench ``config/method/opcm/opcm.yaml`` and the paper's experiments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from mergelab.continual.rules import RuleCtx, register_rule
from mergelab.continual.rules.swa import running_mean
from mergelab.ops.spectral import LOW_RANK, LOW_RANK_COMPAT, RANK_TOL, check_rank_tol, dropped_below
from mergelab.ops.svd import svd


def split_rank(singular_values: torch.Tensor, alpha: float, projection: str) -> int:
    """Number of leading singular directions whose block is removed (see module docstring)."""
    total = singular_values.sum()
    if not bool(total > 0):
        return 0
    ratio = singular_values.cumsum(dim=0) / total
    if projection == "official":
        return int((ratio > alpha).float().argmax())
    return int((ratio >= alpha).float().argmax()) + 1


def project_out(merged_tv: torch.Tensor, tau: torch.Tensor, alpha: float, projection: str,
                rank_tol: float = 0.0) -> torch.Tensor:
    """``tau`` with its components in ``merged_tv``'s dominant singular subspace removed (2-D).
    ``rank_tol > 0`` (``low_rank="auto"``): the official diagonal leaves out the pairs whose singular
    value is ``<= rank_tol * s_1`` (see the module docstring)."""
    if not bool(merged_tv.abs().amax() > 0):
        return tau  # nothing merged yet in this matrix: no subspace to avoid
    # exact, in the compute dtype (float32 by default), as the official code: the official
    # projection uses every singular pair, so the Gram path (accurate in the top ones) does not apply;
    # ops.svd.svd decomposes wide matrices through their transpose (2-5x faster on CPU) and picks the CUDA driver
    u, s, vh = svd(merged_tv)  # (m,k) (k,) (k,n)
    v = vh.mT
    r = split_rank(s, alpha, projection)
    removed = u[:, :r] @ (u[:, :r].mT @ tau @ v[:, :r]) @ v[:, :r].mT
    if projection == "official":
        # diagonal entries P_ii = u_i^T tau v_i for i >= r (those below r are inside the block)
        u_tail, v_tail = u[:, r:], v[:, r:]
        if rank_tol > 0:
            live = s[r:] > rank_tol * s[0]
            if not bool(live.all()):  # null-space pairs: arbitrary vectors, left out
                u_tail, v_tail = u_tail[:, live], v_tail[:, live]
        diag = (u_tail * (tau @ v_tail)).sum(dim=0)  # (k - r,)
        removed = removed + (u_tail * diag) @ v_tail.mT
    cleaned: torch.Tensor = tau - removed
    return cleaned


def _check(hp: dict[str, Any], n_models: int) -> None:
    if not 0.0 <= hp["alpha"] <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {hp['alpha']}")
    check_rank_tol(hp)


def _rescaled(ctx: RuleCtx, hp: dict[str, Any]) -> bool:
    """The global norm rescaling covers every tensor, or only matrices in the 'average' variant."""
    return hp["non_matrix"] == "official" or ctx.matrix


def _norms(scalars: Mapping[str, float], count: int) -> tuple[float, float]:
    """The average norm of the task vectors seen so far and the norm of the state (Eq. 10's two norms)."""
    return scalars["norm_sum"] / count, math.sqrt(scalars["state_norm_sq"])


def adaptive_lambda(scalars: Mapping[str, float], count: int) -> float:
    """Eq. (10): ``lambda_t = ||lambda_{t-1} tau_merged + P(tau_t)|| / mean_i ||tau_i||`` from the merger's
    scalars after ``count`` models; 0 when every task vector so far is zero."""
    average_norm, state_norm = _norms(scalars, count)
    return state_norm / average_norm if average_norm > 0 else 0.0


def _read(state: torch.Tensor, ctx: RuleCtx, **hp: Any) -> torch.Tensor:
    """The state divided by ``lambda_t``: Eq. (10)'s (the average task-vector norm restored) or ``sqrt(t)``."""
    if not _rescaled(ctx, hp):
        return state
    if hp["lambda_t"] == "sqrt":
        return state / math.sqrt(ctx.count)
    average_norm, state_norm = _norms(ctx.scalars, ctx.count)
    factor = average_norm / state_norm if state_norm > 0 else 0.0
    return factor * state


@register_rule(
    "opcm",
    defaults={"alpha": 0.5, "seed": 0, "projection": "official", "non_matrix": "official", "exclude": [],
              "low_rank": "auto", "rank_tol": RANK_TOL, "lambda_t": "adaptive"},
    choices={"projection": ("official", "paper"), "non_matrix": ("official", "average"), "low_rank": LOW_RANK,
             "lambda_t": ("adaptive", "sqrt")},
    check=_check,
    read=_read,
    in_norm=_rescaled,
    legacy={"low_rank": "official"},  # states saved before the option continue as they began
    # experiment runs stored before these options keep their identity at the values that behave as then
    compat={"lambda_t": "adaptive", **LOW_RANK_COMPAT},
    step_record=lambda scalars, count: {"lambda_t": adaptive_lambda(scalars, count)},  # its Fig. 7
    summary="project each new task vector off the merged one's dominant singular subspace, add, rescale",
    source="Tang et al. arXiv:2501.09522 Eq. (6)-(10); official tanganke/opcm (FusionBench "
    "method/opcm/opcm.py merge_linear_weights); default alpha 0.5 from FusionBench config/method/opcm/opcm.yaml",
)
def opcm(state: torch.Tensor | None, tau: torch.Tensor, ctx: RuleCtx, *, alpha: float, seed: int, projection: str,
         non_matrix: str, exclude: list[str], low_rank: str, rank_tol: float, lambda_t: str) -> torch.Tensor:
    """The state is the un-normalised running sum ``lambda_t * tau_merged``."""
    if state is None:
        return tau
    if ctx.matrix:
        return state + project_out(state, tau, alpha, projection, dropped_below(low_rank, rank_tol))
    if non_matrix == "average":
        return running_mean(state, tau, ctx.count)
    return state + tau
