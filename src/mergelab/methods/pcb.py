"""PCB-Merging (Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024,
arXiv:2410.02396), Sec. 3: score every entry of every task vector by intra-balancing
(``Softmax(N * Norm(tau_i * tau_i))``, N = number of models) times inter-balancing (a sum over
``j`` of an activation of ``tau_i * tau_j``), drop the lowest ``1 - ratio`` of each model's
scores, and take the score-weighted mean: ``theta = theta_0 + scaling * sum_i w_i tau_i / sum_i w_i``.

The official code (duguodong7/pcb-merging) computes, over the *whole flattened task vector* of
each model (T rows of d entries)::

    c_i   = clamp(|tau_i|, lo_i, hi_i)             # lo, hi: sorted[int(d*q)], sorted[int(d*(1-q)-1)]
    n_i   = Norm(c_i) = (c_i - lo_i) / (hi_i - lo_i)
    beta_i = exp(N * n_i**2) * inter_i            # exp: Softmax up to a row constant, which cancels below
    w_i   = Norm(clamp(beta_i, Q_i, max beta_i))   # Q_i = sorted(beta_i)[int(d*(1-ratio))]
    delta = sum_i w_i * scaling * sign(tau_i) * c_i / max(sum_i w_i, 1e-12)

Its four copies differ in the clipping quantile ``q`` and in ``inter_i``; ``variant`` picks one:

* ``"vision_es"`` (default): ``vision_source_code/pcb_ES.py::PCB`` (lines 15-31), ``q = 1 %``,
  ``inter_i = sum_j tanh(s_i * s_j)`` with ``s = sign(tau) * Norm(c)``.
* ``"vision"``: ``vision_source_code/pcb.py`` (``__main__``, lines 81-105), ``q = 1 %``,
  ``inter_i = tanh(tau_i * sum_j s_j)``.
* ``"nlp"``: ``nlp_source_code/utils/merge_utils.py::task_para_att_merge`` (lines 434-448),
  ``q = 1 %``, ``inter_i = tanh(tau_i * sum_j tau_j)``.
* ``"root"``: ``pcb-merging.py::PCB_merge`` (lines 31-45), ``q = 0.01 %``, inter as ``"nlp"``.

The default is the only copy whose inter-balancing is, as in the paper, a *sum over j of activated
pairwise terms* of normalised task vectors; the others apply ``tanh`` once to the raw ``tau_i``
times a sum, which for the small entries of typical task vectors is nearly linear and so depends on the
units of ``tau``. All four share the intra term and the drop-and-rescale step.

``scope="global"`` (default, official) needs model-wide quantiles: the collector selects them
exactly (equal to sorting the flattened vectors) with ``ops.select.StreamingKth``: passes 0-1
give ``lo, hi`` of ``|tau|``, passes 2-3 give ``Q`` and ``max`` of the scores, which depend on
``lo, hi``; 4 statistics passes, then the merge pass. ``scope="tensor"`` runs the same algorithm
on each tensor alone.

Defaults: ``ratio=0.05`` (``pcb_ratio``/``att_ratio`` in pcb_ES.py:103, pcb.py:85,
pcb-merging.py:53). ``scaling=1.0``: the starting point of the official lambda search
(pcb_ES.py:114, ``init=[1.0]*n``) and the data-free lambda Weight Weaving uses for PCB (Table 1);
the fixed-lambda vision script uses 1.2 (pcb.py:103): pass ``scaling=1.2`` to reproduce it.

Departures: where the official code divides by zero (all clipped magnitudes of a row equal, or a
row's top score equal to its drop threshold) it yields NaN; we use weight 0. ``scaling`` is
applied where each script applies lambda (after the weighted mean for nlp/root, nlp merging.py:351;
before it for the vision copies, pcb.py:104, pcb_ES.py:36): in float32 the streamed result then
equals each script's bit for bit on our tests.
With ``dtype="float64"`` the quantiles are selected among the float32-rounded values
(``StreamingKth`` keys are float32).
"""

from __future__ import annotations

from typing import Any

import torch

from mergelab.methods.registry import Elementwise, Streaming, TensorCtx, register
from mergelab.ops.select import StreamingKth

VARIANTS = ("vision_es", "vision", "nlp", "root")
CLIP_QUANTILE = {"vision_es": 0.01, "vision": 0.01, "nlp": 0.01, "root": 0.0001}


def clip_ranks(d: int, variant: str) -> list[int]:
    """1-based ranks of the official ``clamp(|tau|, min_ratio=q, max_ratio=q)`` bounds among d values."""
    q = CLIP_QUANTILE[variant]
    return [int(d * q) + 1, int(d * (1 - q) - 1) + 1]


def score_ranks(d: int, ratio: float) -> list[int]:
    """Ranks of ``clamp(scores, min_ratio=1 - ratio, max_ratio=0)``: the drop threshold and the maximum."""
    return [min(int(d * (1 - ratio)) + 1, d), d]  # min(): a ratio within rounding of 0 keeps none, not IndexError


def norm01(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Official min-max ``normalize`` given the row bounds (T, 1); 0 where ``high == low`` (official: NaN)."""
    span = high - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, 1.0), 0.0)


def balancing(flat: torch.Tensor, low: torch.Tensor, high: torch.Tensor, variant: str) -> torch.Tensor:
    """PCB scores ``intra * inter`` of ``flat`` (T, n) given each row's |tau| clip bounds (T, 1)."""
    normed = norm01(flat.abs().clamp(low, high), low, high)  # (T, n)
    intra = torch.exp(flat.shape[0] * normed**2)
    if variant == "vision_es":
        signed = torch.sign(flat) * normed
        inter = torch.stack([torch.tanh(row * signed).sum(dim=0) for row in signed])  # (T, n), T x (T, n) at a time
    elif variant == "vision":
        inter = torch.tanh(flat * (torch.sign(flat) * normed).sum(dim=0))
    else:
        inter = torch.tanh(flat * flat.sum(dim=0))
    return intra * inter


def merge_flat(
    flat: torch.Tensor, bounds: torch.Tensor, score_bounds: torch.Tensor, variant: str, scaling: float
) -> torch.Tensor:
    """Merged delta (n,) of ``flat`` (T, n) given |tau| clip bounds and score bounds, both (T, 2)."""
    low, high = bounds[:, :1], bounds[:, 1:]
    scores = balancing(flat, low, high, variant)
    drop, top = score_bounds[:, :1], score_bounds[:, 1:]
    weights = norm01(scores.clamp(min=drop), drop, top)  # <= drop threshold -> 0, row maximum -> 1
    clipped = torch.sign(flat) * flat.abs().clamp(low, high)
    if variant in ("nlp", "root"):  # lambda after the mean (nlp merging.py:351), before it in the vision scripts
        return scaling * ((clipped * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-12))
    return (clipped * scaling * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-12)


def _row_kth(values: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    return torch.stack([values.kthvalue(k, dim=1).values for k in ranks], dim=1)  # (T, len(ranks))


class PcbStats:
    """Passes 0-1: |tau| clip bounds per task vector; passes 2-3: bounds of the balancing scores."""

    n_passes = 4

    def __init__(self, hp: dict[str, Any], n_models: int):
        self.ratio, self.variant, self.n_models = hp["ratio"], hp["variant"], n_models
        self.selector = StreamingKth(n_models)
        self.d = 0  # parameters per task vector, known after pass 0
        self.bounds = torch.zeros(n_models, 2, dtype=torch.float64)
        self.score_bounds = torch.zeros(n_models, 2, dtype=torch.float64)

    def observe(self, index: int, name: str, taus: torch.Tensor, base: torch.Tensor) -> None:
        flat = taus.reshape(self.n_models, -1)
        if index < 2:
            self.selector.observe(flat.abs())
            return
        bounds = self.bounds.to(flat.device, flat.dtype)
        self.selector.observe(balancing(flat, bounds[:, :1], bounds[:, 1:], self.variant))

    def end_pass(self, index: int) -> None:
        if index == 0:
            self.d = self.selector.count
        if self.d == 0:
            return  # no floating tensor: nothing to select
        if index == 0:
            self.selector.end_pass0([clip_ranks(self.d, self.variant)] * self.n_models)
        elif index == 1:
            self.bounds = torch.tensor(self.selector.values(), dtype=torch.float64)
            self.selector = StreamingKth(self.n_models)  # allocated only now: one histogram set alive at a time
        elif index == 2:
            self.selector.end_pass0([score_ranks(self.d, self.ratio)] * self.n_models)
        else:
            self.score_bounds = torch.tensor(self.selector.values(), dtype=torch.float64)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bounds, self.score_bounds


def _check(hp: dict[str, Any], n_models: int) -> None:
    if not 0.0 < hp["ratio"] <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {hp['ratio']}")


@register(
    "pcb",
    defaults={"ratio": 0.05, "scaling": 1.0, "variant": "vision_es", "scope": "global"},
    choices={"variant": VARIANTS, "scope": ("global", "tensor")},
    summary="intra/inter parameter-competition balancing scores, drop the lowest, score-weighted mean",
    source="Du et al. NeurIPS 2024; official duguodong7/pcb-merging vision_source_code/pcb_ES.py::PCB "
    "(variants vision, nlp, root); ratio 0.05 (pcb_ES.py:103), scaling 1.0 (pcb_ES.py:114 init, Weight Weaving Table 1)",
    check=_check,
    streaming=Streaming(stats=lambda hp, n: PcbStats(hp, n) if hp["scope"] == "global" else None),
    linear_in_scaling=True,
    elementwise=Elementwise(when=lambda hp: hp["scope"] == "global"),
)
def pcb(
    taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, *, ratio: float, scaling: float, variant: str, scope: str
) -> torch.Tensor:
    flat = taus.reshape(taus.shape[0], -1)  # (T, n)
    if scope == "global":
        bounds, score_bounds = (b.to(flat.device, flat.dtype) for b in ctx.stats)
    else:
        bounds = _row_kth(flat.abs(), clip_ranks(flat.shape[1], variant))
        scores = balancing(flat, bounds[:, :1], bounds[:, 1:], variant)
        score_bounds = _row_kth(scores, score_ranks(flat.shape[1], ratio))
    return merge_flat(flat, bounds, score_bounds, variant, scaling).reshape(base.shape)
