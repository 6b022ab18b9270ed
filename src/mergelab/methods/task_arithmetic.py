"""Task Arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, arXiv:2212.04089).

Eq. (1)-(2) of the paper: ``theta = theta_0 + scaling * sum_t tau_t`` with ``tau_t = theta_t - theta_0``.

Default ``scaling=0.3``: FusionBench ``config/method/task_arithmetic.yaml`` (``scaling_factor: 0.3``),
the value the paper's own grid {0.05..1.0} most often selects for 8 ViT tasks and the usual data-free
choice. The paper itself tunes ``scaling`` on validation data; set it explicitly when you can.
"""

from __future__ import annotations

from typing import Any

import torch

from mergelab.methods.registry import Elementwise, TensorCtx, register
from mergelab.ops import native


def _check(hp: dict[str, Any], n_models: int) -> None:
    if not -1e6 < hp["scaling"] < 1e6:
        raise ValueError(f"scaling={hp['scaling']} is not a finite number")


def _fused(base: torch.Tensor, models: list[torch.Tensor], out: torch.Tensor, ctx: TensorCtx, *, scaling: float) -> bool:
    """:func:`task_arithmetic` and the engine's ``base + delta`` in one compiled loop (``native.py``:
    the same arithmetic, up to summation order); False (the plain path) for inputs it does not take
    or an Inf/NaN to report."""
    kernels = native.kernels()
    if kernels is None or len(models) > native.MAX_MERGE_MODELS or not native.takes(base, models):
        return False
    return kernels.task_arithmetic(base, models, scaling, out)


@register(
    "task_arithmetic",
    defaults={"scaling": 0.3},
    summary="base + scaling * sum of task vectors",
    source="Ilharco et al. ICLR 2023 Eq. (2); default scaling 0.3 from FusionBench config/method/task_arithmetic.yaml",
    check=_check,
    linear_in_scaling=True,
    elementwise=Elementwise(),
    fused=_fused,
)
def task_arithmetic(taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, *, scaling: float) -> torch.Tensor:
    return taus.sum(dim=0) * scaling
