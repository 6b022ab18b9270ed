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

from mergelab.methods.registry import Elementwise, TensorCtx, merge_method


def _check(hp: dict[str, Any], n_models: int) -> None:
    """Called with the resolved hyperparameters before any tensor is read: a ValueError becomes a one-line
    MergelabError that names the method."""
    if hp["scaling"] < 0:
        raise ValueError(f"scaling must be >= 0, got {hp['scaling']}")


@merge_method(
    "toy_median",
    "examples/toy_method/toy_median.py",  # the paper and official code followed (here: this file)
    check=_check,
    elementwise=Elementwise(),  # output element i needs element i of each task vector only: merged in column chunks
    linear_in_scaling=True,  # scaling * g(taus): weave may pool it in closed form
)
def toy_median(taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, *, scaling: float = 1.0) -> torch.Tensor:
    """elementwise median of the task vectors (a worked example)

    The first line above is the summary ``mergelab methods`` shows; the keyword-only parameters are the
    hyperparameters, with their defaults (no others are accepted). ``taus``: the stacked task vectors
    ``(T, ...)`` of one tensor (or of one column chunk, ``(T, c)``).
    """
    return taus.median(dim=0).values * scaling
