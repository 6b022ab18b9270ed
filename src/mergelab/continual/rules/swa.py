"""SWA: running average of the models (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima";
OPCM paper App. C, Eq. 33): state = mean of the task vectors so far; merged = base + state."""

from __future__ import annotations

from typing import Any

import torch

from mergelab.continual.rules import RuleCtx, register_rule, state_itself


def running_mean(state: torch.Tensor, tau: torch.Tensor, count: int) -> torch.Tensor:
    """Running mean after ``count`` previous models: ``state + (tau - state) / (count + 1)``."""
    return state + (tau - state) / (count + 1)


@register_rule(
    "swa",
    defaults={},
    read=state_itself,
    summary="running average of the models (no hyperparameters)",
    source="Izmailov et al. 2018; OPCM paper (arXiv:2501.09522) App. C Eq. 33",
)
def swa(state: torch.Tensor | None, tau: torch.Tensor, ctx: RuleCtx, **hp: Any) -> torch.Tensor:
    return tau if state is None else running_mean(state, tau, ctx.count)
