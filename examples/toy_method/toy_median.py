"""A merging method of your own, in one module: the elementwise median of the task vectors (a worked
example of docs/architecture.md, "Adding a method"; tests/methods/test_toy_example.py runs it).

``theta = theta_0 + scaling * median_t(tau_t)`` -- for an even number of models torch's ``median`` takes the
lower of the two middle values. Default ``scaling=1.0``. Importing this module registers ``toy_median``:
``mergelab.merge("toy_median", base, models)``, ``mergelab.plan``, experiments and searches take it
like a built-in method (the command line too, from a Python entry point that imports this module first).
"""

from __future__ import annotations

from typing import Any

import torch

from mergelab.methods.registry import TensorCtx, register


def _check(hp: dict[str, Any], n_models: int) -> None:
    """Called with the resolved hyperparameters before any tensor is read: a ValueError becomes a one-line
    MergelabError that names the method."""
    if hp["scaling"] < 0:
        raise ValueError(f"scaling must be >= 0, got {hp['scaling']}")


@register(
    "toy_median",
    defaults={"scaling": 1.0},  # every hyperparameter, with its default: no others are accepted
    summary="elementwise median of the task vectors (a worked example)",
    source="examples/toy_method/toy_median.py",
    check=_check,
    elementwise=True,  # output element i needs element i of each task vector only: merged in column chunks
    linear_in_scaling=True,  # scaling * g(taus): weave may pool it in closed form
)
def toy_median(taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, *, scaling: float) -> torch.Tensor:
    """``taus``: the stacked task vectors ``(T, ...)`` of one tensor (or of one column chunk, ``(T, c)``)."""
    return taus.median(dim=0).values * scaling
