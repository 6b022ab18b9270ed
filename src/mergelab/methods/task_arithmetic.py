"""Task Arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, arXiv:2212.04089).

Eq. (1)-(2) of the paper: ``theta = theta_0 + scaling * sum_t tau_t`` with ``tau_t = theta_t - theta_0``.

Default ``scaling=0.3``: FusionBench ``config/method/task_arithmetic.yaml`` (``scaling_factor: 0.3``),
the value the paper's own grid {0.05..1.0} most often selects for 8 ViT tasks and the usual data-free
choice. The paper itself tunes ``scaling`` on validation data; set it explicitly when you can.
"""

from __future__ import annotations

from typing import Any

import torch

from mergelab.methods.registry import TensorCtx, register


def _check(hp: dict[str, Any], n_models: int) -> None:
    if not -1e6 < hp["scaling"] < 1e6:
        raise ValueError(f"scaling={hp['scaling']} is not a finite number")


@register(
    "task_arithmetic",
    defaults={"scaling": 0.3},
    summary="base + scaling * sum of task vectors",
    source="Ilharco et al. ICLR 2023 Eq. (2); default scaling 0.3 from FusionBench config/method/task_arithmetic.yaml",
    check=_check,
    linear_in_scaling=True,
    elementwise=True,
)
def task_arithmetic(taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, *, scaling: float) -> torch.Tensor:
    return taus.sum(dim=0) * scaling
