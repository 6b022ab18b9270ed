"""Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
Sparse Masks", ECCV 2024, arXiv:2312.06795): mask out each task vector's largest-magnitude
outliers (fraction ``gamma``) and its small perturbations, keeping the next ``density`` fraction,
then Task Arithmetic: ``theta = theta_0 + scaling * sum_t mask_t * tau_t``.

* ``scope="row"`` (default) follows the official code (rezazzr/breadcrumbs, ``src/task_vectors.py::
  TaskVectorMiddleKeep`` with ``remove_first=True``): per *row* (last dimension) of each tensor,
  zero the top ``int(gamma * n)`` magnitudes, then keep the top ``int(density * n)`` of what is
  left; 0-d tensors are left untouched. The removed outliers stay removed when the second top-k
  picks their zeroed positions (sparse rows, ``density + gamma > 1``): the official code multiplies
  the outlier-zeroed row by the second mask.
* ``scope="tensor"`` is mergekit's per-tensor variant (``sparsify.py::magnitude_outliers``):
  sort the whole tensor, drop ``int(gamma * N)`` largest and keep ``int(density * N)``. mergekit up to
  0.1.4 sliced ``indices[n_bot:-n_top]``, empty when ``int(gamma * N) == 0`` (every small tensor's task
  vector silently dropped); 0.1.5 slices ``indices[n_bot : n_bot + target_n]``, which is our rule (and
  ``benchmarks/bench_peers.py`` finds our per-tensor outputs equal to mergekit 0.1.5's).

Defaults: ``density=0.15, gamma=0.006`` -- the official search's starting point
(``find_best_hyperparam.py``, ``points_to_evaluate = [{"alpha": 0.2, "beta": 0.15, "gamma": 0.006}]``);
``scaling=0.3``, the authors' value reported in Weight Weaving's Table 1.
"""

from __future__ import annotations

from typing import Any

import torch

from mergelab.methods.registry import TensorCtx, register


def row_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Official per-row rule: remove the top ``int(gamma*n)``, then keep the top ``int(density*n)`` of
    what is left. The outliers stay removed even when the second top-k lands on their (now zero)
    positions, as in the official code, which multiplies the already outlier-zeroed row: that happens
    whenever a row has fewer nonzero entries than the kept count (frozen or unchanged parameters,
    merged adapters) or ``density + gamma > 1``."""
    if tau.dim() == 0:
        return torch.ones_like(tau, dtype=torch.bool)
    n = tau.shape[-1]
    outlier = torch.zeros_like(tau, dtype=torch.bool)
    n_top = int(n * gamma)
    if n_top:
        outlier.scatter_(-1, tau.abs().topk(n_top, dim=-1).indices, True)
    removed = tau.masked_fill(outlier, 0.0)
    keep = torch.zeros_like(tau, dtype=torch.bool)
    n_keep = int(n * density)
    if n_keep:
        keep.scatter_(-1, removed.abs().topk(n_keep, dim=-1).indices, True)
    return keep & ~outlier


def tensor_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Per-tensor rule: keep sorted ranks ``[n_bot, N - n_top)`` (mergekit, without its empty slice)."""
    total = tau.numel()
    n_keep, n_top = int(density * total), int(gamma * total)
    n_bot = total - n_keep - n_top
    if n_bot < 0:  # density + gamma > 1: remove fewer outliers to reach the density
        n_top, n_bot = n_top + n_bot, 0
    order = tau.abs().reshape(-1).argsort()
    keep = torch.zeros(total, dtype=torch.bool, device=tau.device)
    keep[order[n_bot : total - n_top]] = True
    return keep.reshape(tau.shape)


def _check(hp: dict[str, Any], n_models: int) -> None:
    for key in ("density", "gamma"):
        if not 0.0 <= hp[key] <= 1.0:
            raise ValueError(f"{key} must be in [0, 1], got {hp[key]}")


@register(
    "breadcrumbs",
    defaults={"density": 0.15, "gamma": 0.006, "scaling": 0.3, "scope": "row"},
    choices={"scope": ("row", "tensor")},
    summary="drop the largest (gamma) and smallest magnitudes, keep density, then task arithmetic",
    source="Davari & Belilovsky ECCV 2024; official rezazzr/breadcrumbs TaskVectorMiddleKeep; "
    "defaults from its find_best_hyperparam.py and Weight Weaving Table 1",
    check=_check,
    linear_in_scaling=True,
)
def breadcrumbs(
    taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, *, density: float, gamma: float, scaling: float, scope: str
) -> torch.Tensor:
    mask_fn = row_mask if scope == "row" else tensor_mask
    merged = torch.zeros_like(taus[0])
    for tau in taus:
        merged += tau * mask_fn(tau, density, gamma)
    return merged * scaling
