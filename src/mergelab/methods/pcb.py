"""PCB-Merging (Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024,
arXiv:2410.02396), Sec. 3: per task vector, an intra-balancing score ``exp(T * Norm(|tau|)^2)``
times an inter-balancing score ``tanh(tau * sum_s tau_s)``; the lowest ``1 - ratio`` of the
scores are dropped, the rest min-max normalised into weights ``w``, and
``theta = theta_0 + scaling * sum_t w_t * clip(tau_t) / sum_t w_t``.

The official repo (duguodong7/pcb-merging) has three versions of the function, selected here by
``variant``; all of them work over the *whole flattened task vector* of each model:

* ``"vision"`` (default; ``vision_source_code/pcb.py``, the paper's ViT experiments, which Weight
  Weaving reproduces): |tau| clipped to its 1 % / 99 % quantiles; inter term
  ``tau_t * sum_s sign(tau_s) * Norm(|tau_s|)``.
* ``"nlp"`` (``nlp_source_code/utils/merge_utils.py::task_para_att_merge``): 1 % / 99 % clipping;
  inter term on the raw task vectors, ``tau_t * sum_s tau_s``.
* ``"root"`` (``pcb-merging.py::PCB_merge``): 0.01 % / 99.99 % clipping; raw inter term.

``Norm`` is the row-wise min-max normalisation of the official ``normalize``; quantiles use its
index rule (``sorted[int(d * r)]`` and ``sorted[int(d * (1 - r) - 1)]``). Where the official
code divides by zero (a row whose clipped magnitudes are all equal) we use 0 instead of NaN.

Model-wide quantiles need statistics passes: two exact streaming selections (``engine.select``)
on |tau| and then on the balancing scores, 4 passes before the merge pass, never holding the
flattened vectors. ``scope="tensor"`` applies the same algorithm per tensor instead.

Defaults: ``ratio=0.05`` (``att_ratio`` of the vision script; the root script also uses 0.05);
``scaling=1.0``, the data-free setting Weight Weaving uses for PCB (Table 1). The vision script's
tuned ``lams = 1.2`` is ``scaling=1.2``.
"""

from __future__ import annotations

from typing import Any

import torch

from mergelab.engine.select import StreamingKth
from mergelab.methods.registry import TensorCtx, register

CLIP_QUANTILE = {"vision": 0.01, "nlp": 0.01, "root": 0.0001}


def clip_ranks(d: int, variant: str) -> list[int]:
    """1-based ranks of the official clamp(min_ratio=r, max_ratio=r) bounds of |tau|."""
    r = CLIP_QUANTILE[variant]
    return [int(d * r) + 1, int(d * (1 - r) - 1) + 1]


def score_ranks(d: int, ratio: float) -> list[int]:
    """Ranks of clamp(scores, min_ratio=1 - ratio, max_ratio=0): the drop quantile and the maximum."""
    return [int(d * (1 - ratio)) + 1, int(d * (1 - 0) - 1) + 1]


def _norm01(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    span = high - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, 1), torch.zeros_like(x))


def balancing(flat: torch.Tensor, low: torch.Tensor, high: torch.Tensor, variant: str) -> torch.Tensor:
    """Intra x inter balancing scores of ``flat`` (T, n), given each row's |tau| clip bounds (T, 1)."""
    clipped = flat.abs().clamp(low, high)
    normed = _norm01(clipped, low, high)
    intra = torch.exp(flat.shape[0] * normed**2)
    partner = (torch.sign(flat) * normed).sum(dim=0) if variant == "vision" else flat.sum(dim=0)
    return intra * torch.tanh(flat * partner)


def merge_flat(flat: torch.Tensor, bounds: torch.Tensor, score_bounds: torch.Tensor, variant: str, scaling: float) -> torch.Tensor:
    """The weighted merge of ``flat`` (T, n) given clip bounds (T, 2) and score bounds (T, 2)."""
    low, high = bounds[:, :1], bounds[:, 1:]
    scores = balancing(flat, low, high, variant)
    q, top = score_bounds[:, :1], score_bounds[:, 1:]
    weights = _norm01(scores.clamp(min=q), q, top)
    clipped = torch.sign(flat) * flat.abs().clamp(low, high) * scaling
    return (clipped * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-12)


def _row_kth(values: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    return torch.stack([values.kthvalue(k, dim=1).values for k in ranks], dim=1)


class PcbStats:
    """Passes 0-1: |tau| clip bounds per task vector; passes 2-3: balancing-score bounds."""

    n_passes = 4

    def __init__(self, hp: dict[str, Any], n_models: int):
        self.hp, self.n_models = hp, n_models
        self.abs_select, self.score_select = StreamingKth(n_models), StreamingKth(n_models)
        self.bounds = self.score_bounds = torch.zeros(n_models, 2)

    def observe(self, index: int, name: str, taus: torch.Tensor, base: torch.Tensor) -> None:
        flat = taus.reshape(self.n_models, -1)
        if index < 2:
            self.abs_select.observe(flat.abs())
            return
        bounds = self.bounds.to(flat.device, flat.dtype)
        self.score_select.observe(balancing(flat, bounds[:, :1], bounds[:, 1:], self.hp["variant"]))

    def end_pass(self, index: int) -> None:
        d = self.abs_select.count
        if index == 0:
            self.abs_select.end_pass0([clip_ranks(d, self.hp["variant"])] * self.n_models)
        elif index == 1:
            self.bounds = torch.tensor(self.abs_select.values(), dtype=torch.float64)
        elif index == 2:
            self.score_select.end_pass0([score_ranks(d, self.hp["ratio"])] * self.n_models)
        else:
            self.score_bounds = torch.tensor(self.score_select.values(), dtype=torch.float64)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bounds, self.score_bounds


def _check(hp: dict[str, Any], n_models: int) -> None:
    if not 0.0 < hp["ratio"] <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {hp['ratio']}")


@register(
    "pcb",
    defaults={"ratio": 0.05, "scaling": 1.0, "variant": "vision", "scope": "global"},
    choices={"variant": ("vision", "nlp", "root"), "scope": ("global", "tensor")},
    summary="intra/inter parameter-competition balancing, drop low scores, weighted average",
    source="Du et al. NeurIPS 2024; official duguodong7/pcb-merging vision_source_code/pcb.py (variants nlp, root); "
    "ratio 0.05 from the vision script, scaling 1.0 as in Weight Weaving Table 1",
    check=_check,
    stats=lambda hp, n: PcbStats(hp, n) if hp["scope"] == "global" else None,
    linear_in_scaling=True,
    elementwise=lambda hp: hp["scope"] == "global",
)
def pcb(
    taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, *, ratio: float, scaling: float, variant: str, scope: str
) -> torch.Tensor:
    flat = taus.reshape(taus.shape[0], -1)
    if scope == "global":
        bounds, score_bounds = (b.to(flat.device, flat.dtype) for b in ctx.stats)
    else:
        bounds = _row_kth(flat.abs(), clip_ranks(flat.shape[1], variant))
        scores = balancing(flat, bounds[:, :1], bounds[:, 1:], variant)
        score_bounds = _row_kth(scores, score_ranks(flat.shape[1], ratio))
    return merge_flat(flat, bounds, score_bounds, variant, scaling).reshape(base.shape)
