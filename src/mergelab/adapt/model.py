"""The differentiable merged model: weights as a function of the coefficients, forwards without model copies.

``MergedWeights`` holds, per floating tensor of the base, ``anchor = base + anchor_delta`` and the per-task
``deltas`` (:mod:`mergelab.ops.adaptive`), computed once; ``weights(coef)`` gives
``{name: anchor + sum_t coef[g(name), t] * delta_t}`` (autograd flows to ``coef``), and ``forward`` runs the
backbone on them through ``torch.func.functional_call``: no module is copied and nothing is loaded per step.
Deltas are kept in float32, or in bfloat16 (``deltas_dtype="bfloat16"``: half the memory) with the sum
accumulated in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergelab.errors import MergelabError
from mergelab.ops import adaptive as components
from mergelab.ops import coefficients as coef

DELTA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class MergedWeights:
    names: list[str]
    anchor: dict[str, torch.Tensor]  # base + anchor delta, float32
    deltas: dict[str, torch.Tensor]  # (T, *shape), float32 or bfloat16
    groups: list[str]  # coefficient rows
    group_index: dict[str, int]  # tensor name -> row
    n_tasks: int

    def weights(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(groups, tasks)`` coefficients -> every merged tensor (float32)."""
        out = {}
        for name in self.names:
            lam, delta = coefficients[self.group_index[name]], self.deltas[name]
            if delta.dtype == torch.float32:
                out[name] = self.anchor[name] + torch.tensordot(lam, delta, dims=1)
            else:  # low-precision storage, float32 accumulation
                acc = self.anchor[name]
                for t in range(self.n_tasks):
                    acc = acc + lam[t] * delta[t].float()
                out[name] = acc
        return out


def build(method: str, hp: Mapping[str, Any], base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]],
          *, device: str = "cpu", deltas_dtype: str = "float32") -> MergedWeights:
    """Anchor and deltas of every floating base tensor for ``method`` with resolved hyperparameters ``hp``.

    ``base``/``models``: lazy mappings name -> tensor (e.g. :class:`_Reader`). AdaMerging++ first needs the
    model-wide TIES thresholds and majority sign, computed here exactly on the whole flattened task vectors."""
    if deltas_dtype not in DELTA_DTYPES:
        raise MergelabError(f"deltas_dtype must be one of {', '.join(DELTA_DTYPES)}, got {deltas_dtype!r}")
    names = [n for n, t in base.items() if t.is_floating_point()]

    def taus_of(name: str) -> torch.Tensor:
        b = base[name].to(device, torch.float32)
        return torch.stack([m[name].to(device, torch.float32) - b for m in models])

    make: Callable[[str, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]]
    if method == "adamerging":
        def make(name: str, taus: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
            return components.task_vectors(taus)
    elif method == "adamerging_pp":
        thresholds = components.ties_thresholds(
            components.flat_magnitudes((taus_of(n) for n in names), len(models)), hp["density"], hp["threshold"])
        majority = components.majority_sign(sum(components.sign_sum(taus_of(n), thresholds) for n in names))

        def make(name: str, taus: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
            return components.ties_selected(taus, thresholds, majority)
    elif method == "cart_pp":
        def make(name: str, taus: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
            return components.cart_components(name, taus, hp["rank_ratio"], hp["exclude"], hp["svd_dtype"])
    else:
        raise MergelabError(f"method {method!r} cannot be adapted; adaptable: adamerging, adamerging_pp, cart_pp")
    anchor, deltas = {}, {}
    for name in names:
        offset, delta = make(name, taus_of(name))
        b = base[name].to(device, torch.float32)
        anchor[name] = b if offset is None else b + offset
        deltas[name] = delta.to(DELTA_DTYPES[deltas_dtype]).contiguous()
    groups = coef.groups_of(names, hp["granularity"])
    index = {g: i for i, g in enumerate(groups)}
    return MergedWeights(names, anchor, deltas, groups, {n: index[coef.group_of(n, hp["granularity"])] for n in names},
                         len(models))


class Functional:
    """``module`` run on given weights (``torch.func.functional_call``); callable like the module itself."""

    def __init__(self, module: torch.nn.Module, weights: dict[str, torch.Tensor]):
        self.module, self.weights = module, weights

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.module, self.weights, args, kwargs, strict=False)
