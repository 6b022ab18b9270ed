"""DARE (Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as
a Free Lunch", ICML 2024, arXiv:2311.03099), Eq. (1)-(2), then Task Arithmetic:
``tau_t' = (m_t * tau_t) / density`` with ``m_t ~ Bernoulli(density)`` per entry, and
``theta = theta_0 + scaling * sum_t tau_t'``.

* ``density`` is the kept fraction (the paper's ``1 - p``). Masks come from a per-tensor CPU
  generator seeded by ``(seed, crc32(name + "/task index"))``, so a merge is reproducible on CPU
  and GPU and in any order (the official code and FusionBench use the global RNG).
* ``rescale_mode="inverse"`` (default, paper and FusionBench ``dare/utils.py::param_random_drop_``):
  kept entries are divided by ``density``. ``rescale_mode="l1"``: mergekit's ``rescale_norm=l1``
  (``sparsify.py::rescaled_masked_tensor``): the masked tensor is scaled to the L1 norm it had
  before masking (unchanged when either norm is below 1e-7). ``rescale=False`` keeps the raw mask.

Defaults ``density=0.5, scaling=0.3, rescale=True``: FusionBench ``config/method/dare/task_arithmetic.yaml``
(``sparsity_ratio: 0.5``, ``scaling_factor: 0.3``); Weight Weaving's Table 1 lists 0.3 as the authors' value.
"""

from __future__ import annotations

from typing import Any

import torch

from mergelab.methods.registry import TensorCtx, register
from mergelab.ops.rng import bernoulli_mask


def drop_and_rescale(taus: torch.Tensor, ctx: TensorCtx, density: float, rescale: bool, mode: str) -> torch.Tensor:
    """DARE applied to every task vector of one tensor; ``taus`` is ``(T, *shape)``."""
    if density >= 1.0:
        return taus
    out = torch.empty_like(taus)
    for t, tau in enumerate(taus):
        mask = bernoulli_mask(tau.shape, density, ctx.generator(f"/{t}"), tau.device)
        kept = tau * mask
        if rescale and mode == "inverse":
            kept = kept / density
        elif rescale and mode == "l1":
            before, after = tau.abs().sum(), kept.abs().sum()
            if before >= 1e-7 and after >= 1e-7:
                kept = kept * (before / after)
        out[t] = kept
    return out


def check_dare(hp: dict[str, Any], n_models: int) -> None:
    if not 0.0 < hp["density"] <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {hp['density']}")


@register(
    "dare",
    defaults={"density": 0.5, "scaling": 0.3, "rescale": True, "seed": 0, "rescale_mode": "inverse"},
    choices={"rescale_mode": ("inverse", "l1")},
    summary="random drop (keep density) + rescale, then task arithmetic",
    source="Yu et al. ICML 2024 Eq. (1)-(2); FusionBench dare/utils.py; defaults from FusionBench dare/task_arithmetic.yaml",
    check=check_dare,
    linear_in_scaling=True,
    randomized=True,
)
def dare(
    taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, *,
    density: float, scaling: float, rescale: bool, seed: int, rescale_mode: str,
) -> torch.Tensor:
    return drop_and_rescale(taus, ctx, density, rescale, rescale_mode).sum(dim=0) * scaling
