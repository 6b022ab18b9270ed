"""Continual TIES as FusionBench ``method/opcm/ties_merging.py``: step 1 ``state = scaling * tau_1``; then
``state += scaling * TIES([state, tau_t])`` with the global (whole-model) top-k and majority sign of the
official TIES code (:mod:`mergelab.methods.ties`): the thresholds of the two rows ``[state, tau]`` come
from streaming passes before each merge pass, and the few parameters that need the model-wide majority
sign are patched after it. Defaults ``scaling=0.5, density=0.2 (threshold 20), merge_func="sum"``
(FusionBench ``config/method/opcm/ties_merging.yaml``)."""

from __future__ import annotations

from typing import Any

import torch

from mergelab.continual.rules import RuleCtx, register_rule, state_itself
from mergelab.methods.registry import TensorCtx
from mergelab.methods.ties import ties
from mergelab.ops.majority import MajorityVote
from mergelab.ops.thresholds import ThresholdPasses


def _check(hp: dict[str, Any], n_models: int) -> None:
    if not 0.0 <= hp["density"] <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {hp['density']}")


def _stats(hp: dict[str, Any]) -> ThresholdPasses:
    """Whole-model TIES thresholds over the two rows [current merged task vector, new tau]."""
    return ThresholdPasses(hp["density"], "official", 2)


def _late(hp: dict[str, Any], stats: Any) -> MajorityVote:
    """The merge pass's votes for the model-wide majority sign; after it, the parameters whose TIES sign
    needed it (see :mod:`mergelab.ops.majority`)."""
    return MajorityVote(hp["merge_func"], hp["scaling"])


@register_rule(
    "continual_ties",
    defaults={"scaling": 0.5, "density": 0.2, "merge_func": "sum"},
    choices={"merge_func": ("mean", "sum", "max")},
    check=_check,
    read=state_itself,
    stats=_stats,
    late=_late,
    summary="state += scaling * TIES([state, tau]) with the whole-model top-k and majority sign",
    source="FusionBench method/opcm/ties_merging.py; defaults scaling 0.5, density 0.2, merge_func sum "
    "from FusionBench config/method/opcm/ties_merging.yaml",
)
def continual_ties(state: torch.Tensor | None, tau: torch.Tensor, ctx: RuleCtx, *,
                   scaling: float, density: float, merge_func: str) -> torch.Tensor:
    if state is None:
        first: torch.Tensor = scaling * tau
        return first
    step_ctx = TensorCtx(name=ctx.name, stats=ctx.stats)
    step = ties(torch.stack([state, tau]), tau, step_ctx, density=density,
                scaling=1.0, merge_func=merge_func, scope="global", threshold="official")
    ctx.late = step_ctx.late  # its vote for the model-wide majority sign
    updated: torch.Tensor = state + scaling * step
    return updated
