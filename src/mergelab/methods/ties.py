"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023, arXiv:2306.01708).

Algorithm 1: trim each task vector to its top-``density`` magnitudes, elect a sign per parameter
by mass (``sign(sum_t trimmed_t)``), take the disjoint mean of the entries agreeing with it, and
add ``scaling`` times the result: ``theta = theta_0 + scaling * disjoint_merge(trim(tau))``.

Follows the official code (prateeky2806/ties-merging, src/utils/merge_utils.py: ``topk_values_mask``,
``resolve_sign``, ``resolve_zero_signs``, ``disjoint_merge``), which FusionBench ports unchanged:

* ``scope="global"`` (default, official/FusionBench): the top-k is taken over the *whole flattened*
  task vector of each model, and parameters whose elected sign is 0 get the model-wide majority
  sign. Both are exact without holding the flattened vectors: the thresholds of ``density`` by the
  engine's statistics passes before the merge pass, a two-pass streaming radix selection
  (:mod:`mergelab.ops.thresholds`; with the compiled kernels, a 1/32 sample pass and one window-count
  pass), handed to :func:`ties` as ``ctx.stats``; the majority sign voted by every merged chunk
  (``ctx.late``, a :class:`~mergelab.ops.majority.Vote`), the (rare) parameters that depend on it
  patched after the merge pass -- 3 reads of the inputs in all (2 and a sample with the kernels). ``scope="tensor"`` applies the same algorithm per tensor (mergekit's choice).
* ``threshold="official"`` (default) keeps ``|tau| >= kthvalue(d - int(d * density))``, i.e. one
  entry more than an exact top-k; ``threshold="exact"`` keeps exactly ``int(d * density)``.
* ``merge_func``: ``"mean"`` (disjoint mean, the paper), ``"sum"`` (FusionBench default), ``"max"``.

Defaults ``density=0.2, scaling=1.0, merge_func="mean"``: the paper's setting without validation
data (top-20 %, lambda = 1; Sec. 6 and App. C.4). FusionBench instead uses ``merge_func="sum",
scaling=0.3`` (config/method/ties_merging.yaml); pass those to reproduce it.
"""

from __future__ import annotations

from typing import Any

import torch

from mergelab.methods.registry import Elementwise, Streaming, TensorCtx, WholeTensors, register
from mergelab.ops import native
from mergelab.ops.majority import MajorityVote, Vote, majority_merged
from mergelab.ops.select import StreamingKth
from mergelab.ops.sparsify import disjoint_merge, elect_sign, keep_mask_, keep_rank, kth_threshold
from mergelab.ops.thresholds import ModelThresholds, ThresholdPasses


def _fused(base: torch.Tensor, models: list[torch.Tensor], out: torch.Tensor, ctx: TensorCtx, *,
           density: float, scaling: float, merge_func: str, scope: str, threshold: str) -> bool:
    """TIES in compiled loops (``native.Kernels``): a column chunk (global scope) or a whole tensor
    (per-tensor scope, thresholds selected here first), the same arithmetic as :func:`ties` below
    (``ops/native.py``: up to summation order). False (the plain :func:`ties`) for inputs the
    kernels do not take or an Inf/NaN to report."""
    kernels = native.kernels()
    if kernels is None or len(models) > native.MAX_MERGE_MODELS or not native.takes(base, models):
        return False
    if scope == "tensor":
        return _fused_tensor(kernels, base, models, out, density, scaling, merge_func, threshold)
    stats: ModelThresholds = ctx.stats
    thresholds = stats.at(density, threshold, torch.float32)
    finite, signs, waiting, trimmed = kernels.ties_merge(base, models, thresholds, scaling, merge_func, out)
    if not finite:
        return False
    # the parameters whose elected sign waits for the model-wide majority, if any
    ctx.late = Vote(signs, waiting + ctx.offset, trimmed) if waiting.numel() else Vote(signs)
    return True


def _fused_tensor(kernels: native.Kernels, base: torch.Tensor, models: list[torch.Tensor], out: torch.Tensor,
                  density: float, scaling: float, merge_func: str, rule: str) -> bool:
    """Per-tensor TIES on one whole (flattened) tensor: its thresholds by the radix selection's kernels
    (two passes over the tensor), the merge by ``ties_merge``; the parameters whose sign sum is 0 get
    this tensor's majority sign (``elect_sign``) at the end, when it is known."""
    n = base.numel()
    rank = keep_rank(n, density, rule)
    if rank <= 0:
        thresholds = torch.zeros(len(models))
    elif rank > n:
        thresholds = torch.full((len(models),), float("inf"))
    else:
        selector = StreamingKth(len(models), nonnegative=True, dtype=torch.float32)
        if not selector.observe_abs_diff(base, models):
            return False  # an Inf/NaN: the plain path reports it
        selector.end_pass0([[rank]] * len(models))
        selector.observe_abs_diff(base, models)
        thresholds = torch.tensor([row[0] for row in selector.values()], dtype=torch.float32)
    finite, signs, waiting, trimmed = kernels.ties_merge(base, models, thresholds, scaling, merge_func, out)
    if not finite:
        return False
    delta = majority_merged(trimmed, signs, merge_func, scaling) if waiting.numel() else None
    if delta is not None:  # this tensor's majority sign is not the provisional +1
        out[waiting] = (base[waiting].to(torch.float32) + delta).to(out.dtype)
    return True


def _check(hp: dict[str, Any], n_models: int) -> None:
    if not 0.0 <= hp["density"] <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {hp['density']}")


def _stats(hp: dict[str, Any], n_models: int) -> ThresholdPasses | None:
    """Global scope: the k-th magnitude of each whole task vector, exactly, in two streaming passes
    (the first a 1/32 sample on the compiled-kernel path)."""
    return ThresholdPasses(hp["density"], hp["threshold"], n_models) if hp["scope"] == "global" else None


def majority_vote(hp: dict[str, Any], stats: ModelThresholds | None) -> MajorityVote | None:
    """Global scope: the merge pass's votes for the model-wide majority sign, gathered; the patches after it."""
    return MajorityVote(hp["merge_func"], hp["scaling"]) if stats is not None else None


@register(
    "ties",
    defaults={"density": 0.2, "scaling": 1.0, "merge_func": "mean", "scope": "global", "threshold": "official"},
    choices={"merge_func": ("mean", "sum", "max"), "scope": ("global", "tensor"), "threshold": ("official", "exact")},
    summary="trim to top-density magnitudes, elect signs, disjoint mean",
    source="Yadav et al. NeurIPS 2023 Alg. 1; official prateeky2806/ties-merging merge_utils.py; "
    "defaults density 0.2, scaling 1.0, mean (paper, no-validation setting)",
    check=_check,
    linear_in_scaling=True,
    elementwise=Elementwise(when=lambda hp: hp["scope"] == "global"),
    streaming=Streaming(stats=_stats, late=majority_vote),  # global scope (both None for scope="tensor")
    # scope="tensor": two more (T, n) arrays than the generic T + 4 (|taus| and kthvalue's working copy);
    # fitted to the benchmark set: 2,840 MB measured, 2,092 MB with the generic count (benchmarks/README.md)
    whole_tensors=WholeTensors(temporaries=lambda hp, t: 3 * t + 4),
    fused=_fused,
)
def ties(
    taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, *,
    density: float, scaling: float, merge_func: str, scope: str, threshold: str,
) -> torch.Tensor:
    flat = taus.reshape(taus.shape[0], -1)  # (T, n)
    if scope == "tensor":
        magnitudes = flat.abs()
        thresholds = kth_threshold(magnitudes, keep_rank(flat.shape[1], density, threshold))
        trimmed = keep_mask_(magnitudes, thresholds).mul_(flat)  # in place: one (T, n) temporary
        sign = elect_sign(trimmed)
    else:  # scope "global": the thresholds of `density` over each whole task vector, from the statistics passes
        stats: ModelThresholds = ctx.stats
        thresholds = stats.at(density, threshold)
        trimmed = keep_mask_(flat.abs(), thresholds.to(flat.device, flat.dtype)).mul_(flat)
        sign = trimmed.sum(dim=0).sign_()
        signs = float(sign.sum())  # an integer: the total is exact, in any order of chunks
        # provisional majority +1 where the sum is 0 (adding the bool mask: a scalar torch.where was
        # 15 % of the merge); those with a non-zero entry wait for the real one
        # (a zero sum of non-zero entries has a positive one, so they are the zero sums with an agreeing entry)
        zero = sign == 0
        sign.add_(zero)
        agree = (trimmed * sign).gt_(0)  # (T, n) float mask: agrees with the elected sign
        count = agree.sum(dim=0)
        if merge_func == "mean":
            merged = agree.mul_(trimmed).sum(dim=0).div_(count.clamp(min=1))
        else:
            merged = disjoint_merge(trimmed, sign, merge_func)
        pending = zero.logical_and_(count > 0)
        if bool(pending.any()):  # rare: skip the scan otherwise
            ambiguous = torch.nonzero(pending).reshape(-1)
            ctx.late = Vote(signs, ambiguous.cpu() + ctx.offset, trimmed[:, ambiguous].cpu())
        else:
            ctx.late = Vote(signs)
        return merged.mul_(scaling).reshape(base.shape)
    return (disjoint_merge(trimmed, sign, merge_func) * scaling).reshape(base.shape)
