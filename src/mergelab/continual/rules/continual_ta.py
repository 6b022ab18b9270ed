"""Continual Task Arithmetic (OPCM paper, arXiv:2501.09522, App. C, Eq. 35; FusionBench
``method/opcm/task_arithmetic.py``): state = sum of the task vectors so far; merged = base + scaling * state.
Default ``scaling=0.3`` (FusionBench ``config/method/opcm/task_arithmetic.yaml``)."""

from __future__ import annotations

import torch

from mergelab.continual.rules import RuleCtx, register_rule


def _read(state: torch.Tensor, ctx: RuleCtx, *, scaling: float) -> torch.Tensor:
    return scaling * state


@register_rule(
    "continual_ta",
    defaults={"scaling": 0.3},
    read=_read,
    summary="running sum of the task vectors, scaled when read",
    source="OPCM paper App. C Eq. 35; FusionBench method/opcm/task_arithmetic.py; "
    "default scaling 0.3 from FusionBench config/method/opcm/task_arithmetic.yaml",
)
def continual_ta(state: torch.Tensor | None, tau: torch.Tensor, ctx: RuleCtx, *, scaling: float) -> torch.Tensor:
    return tau if state is None else state + tau
