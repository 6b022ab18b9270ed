"""MagMax (Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning",
ECCV 2024, arXiv:2407.06322), Sec. 3: per parameter, keep the task-vector entry of largest
magnitude, ``tau_max[j] = tau_{t*}[j]`` with ``t* = argmax_t |tau_t[j]|``, then
``theta = theta_0 + scaling * tau_max``.

Follows the official code (danielm1405/magmax, ``src/merging/task_vectors.py::merge_max_abs``):
task vectors are scanned in order and a later one replaces the running choice when its magnitude
is *greater or equal* -- so on equal magnitudes the later task wins (FusionBench pins the same rule
in ``tests/test_magmax.py``).

Default ``scaling=0.5``: the official 8-dataset script's ``scaling_coef`` and FusionBench
``config/method/magmax/magmax.yaml``; Weight Weaving's Table 1 lists it as the authors' value.
"""

from __future__ import annotations

import torch

from mergelab.methods.registry import Elementwise, TensorCtx, register


def max_magnitude(taus: torch.Tensor) -> torch.Tensor:
    """Entry of largest |.| along dim 0; ties go to the later row (official ``>=`` scan)."""
    chosen = taus[0].clone()
    for tau in taus[1:]:
        chosen = torch.where(tau.abs() >= chosen.abs(), tau, chosen)
    return chosen


@register(
    "magmax",
    defaults={"scaling": 0.5},
    summary="per parameter, the task-vector entry of largest magnitude",
    source="Marczak et al. ECCV 2024; official danielm1405/magmax merge_max_abs; scaling 0.5 from its script / FusionBench",
    linear_in_scaling=True,
    elementwise=Elementwise(),
)
def magmax(taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, *, scaling: float) -> torch.Tensor:
    return max_magnitude(taus) * scaling
