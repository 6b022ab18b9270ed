"""Weight Weaving (Chaves et al., "Weight Weaving: Parameter Pooling for Data-Free Model Merging",
arXiv:2510.13921), Algorithm 1::

    A_i    = f_merge(delta_weights, lambda_i)          for lambda_i in lambda_search   (lines 7-9)
    A*     = delta_weights  U  {A_1, ..., A_K}                                          (line 10)
    theta_final = theta_pre + f_pooling(A*)                                            (lines 11-12)

"A* <- {delta_weights U augmented_weights} ... It has a size of N x P, where N is the number of
fine-tuned models plus the cardinality of the search space": the pool holds the T task vectors
*and* the K merged task vectors, and the pooled vector is added to the base as it is (no rescaling
after pooling). ``inner`` is ``f_merge``; its ``scaling`` is the lambda that is searched over, so
``weave`` takes every hyperparameter of the inner method except ``scaling``.

Pooling (Sec. 5.3): ``average`` (default, "parameter-wise arithmetic mean", Table 2), ``random``
(per parameter one member of A* drawn uniformly, from the tensor's own seeded generator: the same
on CPU and GPU, in any tensor order) and ``magmax`` (per parameter the member of largest magnitude,
scanned in A*'s order with MagMax's official ``>=`` rule, so on equal magnitudes the later member
wins; the paper's "[21]" is MagMax).

Search spaces (Sec. 4, "Ranges for lambda_search"), chosen with ``preset`` (``lambdas`` overrides):
0.1, 0.2, ..., 1.0 for every method in ``continual`` and ``domain_generalization`` and for Task
Arithmetic, Breadcrumbs and MagMax everywhere; in ``multitask`` (default preset) TIES 0.1..1.5,
PCB 0.1..2.5, TSV 0.5..2.0 and Iso-C 0.1..2.0 ("following the search space provided by their
respective authors"). The paper gives the wider ranges as intervals only; we step them by 0.1 like
the standard range (an assumption: the official code, github.com/VirtualSpaceman/weight_weaving, is
not reachable from here). Methods the paper does not list (dare, dare_ties, iso_cts, cart) get the
standard range.

Computation. An inner method that declares ``linear_in_scaling`` computes ``A_i = lambda_i * g``:
``g`` (the inner merge at scaling 1) is computed once per tensor and every pooling is exact from it
-- ``average`` in closed form ``(sum_t tau_t + (sum_i lambda_i) g) / (T + K)`` (Weight Weaving's
"fast path"), ``random`` picks ``tau_j`` or ``lambda_i g``, ``magmax`` compares ``max_t |tau_t|``
with ``max_i |lambda_i| |g|``. Any other inner method (``cart``: affine, not linear, in its
scaling), or ``path="general"``, evaluates the inner method once per lambda and pools on the fly: a running sum, a running choice or
a running maximum, so memory holds one merged tensor at a time, never K merged models. Inner methods
with a model-wide correction (``late`` patches: TIES' majority sign for exactly cancelling parameters)
use the linear path, and weave re-pools the entries the correction patches; ``path="general"`` is
refused for them (``ties`` / ``dare_ties`` with ``scope="global"``; ``scope="tensor"`` has no such step).
``path="general"`` exists to check the fast path against Algorithm 1 (tests/methods/test_weave.py) and
for inner methods registered by users without ``linear_in_scaling``.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mergelab.errors import MergelabError
from mergelab.methods.magmax import max_magnitude
from mergelab.methods.registry import (
    Collector,
    Elementwise,
    Late,
    Method,
    Resolution,
    Streaming,
    TensorCtx,
    WholeTensors,
    get_method,
    register,
    resolve_hparams,
)
from mergelab.ops.pool import BlockPool

POOLINGS = ("average", "random", "magmax")
PATHS = ("auto", "general")


def _steps(start: float, stop: float) -> list[float]:
    """``start, start + 0.1, ..., stop`` rounded to one decimal (no float drift in the list)."""
    return [round(start + 0.1 * i, 1) for i in range(round((stop - start) / 0.1) + 1)]


STANDARD = _steps(0.1, 1.0)
PRESETS: dict[str, dict[str, list[float]]] = {
    "multitask": {"ties": _steps(0.1, 1.5), "pcb": _steps(0.1, 2.5), "tsv": _steps(0.5, 2.0), "iso_c": _steps(0.1, 2.0)},
    "continual": {},
    "domain_generalization": {},
}
OWN = {"inner": "task_arithmetic", "lambdas": None, "preset": "multitask", "pooling": "average", "path": "auto",
       "seed": 0}
CHOICES = {"pooling": POOLINGS, "path": PATHS, "preset": tuple(PRESETS)}


def _describe(preset: str) -> str:
    """One line per preset for ``mergelab methods``: the lambda range of each inner method."""
    spans = [f"{inner} {space[0]}..{space[-1]}" for inner, space in PRESETS[preset].items()]
    return ", ".join([*spans, f"{'other inner methods' if spans else 'every inner method'} 0.1..1.0"]) + " (step 0.1)"


def search_space(inner: str, preset: str) -> list[float]:
    """The paper's lambda search space for ``inner`` in the setting ``preset``."""
    return list(PRESETS[preset].get(inner, STANDARD))


def resolve(hparams: Mapping[str, Any], n_models: int) -> dict[str, Any]:
    """weave's own hyperparameters plus the inner method's, validated by the inner method itself
    (``seed`` is shared: it seeds random pooling and, if it has one, the inner method)."""
    own = resolve_hparams("weave", OWN, CHOICES, None, {k: v for k, v in hparams.items() if k in OWN}, n_models)
    inner = get_method(own["inner"])
    if inner.name == "weave" or "scaling" not in inner.defaults:
        raise MergelabError(f"method 'weave': inner={inner.name!r} has no scaling to search over")
    rest = {k: v for k, v in hparams.items() if k not in OWN}
    if "scaling" in rest:
        raise MergelabError("method 'weave': scaling is the searched lambda; give lambdas=[...] instead")
    if "seed" in inner.defaults:
        rest["seed"] = own["seed"]
    inner_hp = inner.resolve(rest, n_models)
    del inner_hp["scaling"]
    if corrects_late(inner, inner_hp, n_models) and (own["path"] == "general" or not inner.linear_in_scaling):
        # re-pooling the late corrections relies on A_i = lambda_i g
        raise MergelabError(
            f"method 'weave': inner={inner.name!r} corrects entries after the merge pass, so it needs the linear "
            "path (path='auto'; for ties / dare_ties, scope='tensor' has no such step)"
        )
    lambdas = own["lambdas"] if own["lambdas"] is not None else search_space(inner.name, own["preset"])
    if (
        not isinstance(lambdas, (list, tuple))
        or not lambdas
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in lambdas)
    ):
        raise MergelabError(f"method 'weave': lambdas={lambdas!r} should be a non-empty list of numbers")
    return {**own, "lambdas": [float(x) for x in lambdas], **inner_hp}


def split(hp: Mapping[str, Any]) -> tuple[Method, dict[str, Any]]:
    """The inner method and its hyperparameters (``seed`` only if it has one), without ``scaling``."""
    inner = get_method(hp["inner"])
    return inner, {k: v for k, v in hp.items() if k in inner.defaults}


def corrects_late(inner: Method, inner_hp: dict[str, Any], n_models: int) -> bool:
    """Whether the inner method patches entries after the merge pass (``late`` patches with statistics)."""
    return inner.corrects_late and inner.collector({**inner_hp, "scaling": 1.0}, n_models) is not None


@dataclass(frozen=True)
class WeaveStats:
    """The inner method's statistics."""

    inner: Any


class WeaveCollector:
    """Runs the inner method's collector unchanged; its result is wrapped in :class:`WeaveStats`."""

    def __init__(self, inner: Collector):
        self.inner = inner

    @property
    def n_passes(self) -> int:  # the inner collector's, as it changes pass by pass
        return int(self.inner.n_passes)

    def passes_for(self, dtype: torch.dtype) -> int:
        passes_for = getattr(self.inner, "passes_for", None)
        return int(passes_for(dtype)) if passes_for is not None else int(self.inner.n_passes)

    @property
    def thread_safe(self) -> bool:  # observing only forwards to the inner collector
        return bool(getattr(self.inner, "thread_safe", False))

    def observe(self, pass_index: int, name: str, taus: torch.Tensor, base: torch.Tensor) -> None:
        self.inner.observe(pass_index, name, taus, base)

    def observe_raw(self, pass_index: int, name: str, base: torch.Tensor, models: list[torch.Tensor]) -> bool:
        """The inner collector's compiled observation, if it has one (False: the engine calls :meth:`observe`)."""
        observe_raw = getattr(self.inner, "observe_raw", None)
        return observe_raw is not None and bool(observe_raw(pass_index, name, base, models))

    def end_pass(self, pass_index: int) -> None:
        self.inner.end_pass(pass_index)

    def result(self) -> WeaveStats:
        return WeaveStats(self.inner.result())


def _stats(hp: dict[str, Any], n_models: int) -> WeaveCollector | None:
    inner, inner_hp = split(hp)
    collector = inner.collector({**inner_hp, "scaling": 1.0}, n_models)
    return WeaveCollector(collector) if collector is not None else None


def _elementwise(hp: dict[str, Any]) -> bool:
    inner, inner_hp = split(hp)
    return hp["pooling"] != "random" and inner.is_elementwise({**inner_hp, "scaling": 1.0})


def _tensor_parallel(hp: dict[str, Any]) -> bool:
    inner, inner_hp = split(hp)
    return inner.is_tensor_parallel({**inner_hp, "scaling": 1.0})


def random_choice(shape: torch.Size, n_members: int, ctx: TensorCtx, device: torch.device) -> torch.Tensor:
    """Per element, the index in A* of the member random pooling takes (uniform, seeded per tensor)."""
    gen = ctx.generator("/weave")
    return torch.randint(n_members, tuple(shape), generator=gen).to(device)


def pool_linear(
    taus: torch.Tensor, g: torch.Tensor, lambdas: list[float], pooling: str, choice: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool A* = {tau_1..tau_T, lambda_1 g..lambda_K g} exactly from ``g``.

    Returns ``(pooled, a, b)`` with ``pooled = a + b * g`` wherever the choice does not depend on
    ``g`` (average, random); for magmax ``a`` is the best task-vector entry and ``b`` the lambda of
    largest magnitude, ``pooled`` the larger of ``a`` and ``b g`` (ties to ``b g``, the later member)."""
    n_taus, n_all = taus.shape[0], taus.shape[0] + len(lambdas)
    if pooling == "average":  # (sum_t tau_t + (sum_i lambda_i) g) / (T + K)
        a = taus.sum(dim=0) / n_all
        b = torch.full_like(g, sum(lambdas) / n_all)
        return a + b * g, a, b
    if pooling == "random":
        assert choice is not None
        scales = torch.tensor([0.0] * n_taus + lambdas, dtype=g.dtype, device=g.device)
        b = scales[choice]
        a = torch.gather(taus, 0, choice.clamp(max=n_taus - 1).unsqueeze(0)).squeeze(0)
        a = torch.where(choice < n_taus, a, 0.0)
        return a + b * g, a, b
    best = max(range(len(lambdas)), key=lambda i: (abs(lambdas[i]), i))  # later member on equal |lambda|
    a = max_magnitude(taus)
    b = torch.full_like(g, lambdas[best])
    return _larger(a, b * g), a, b


def _larger(a: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
    return torch.where(scaled.abs() >= a.abs(), scaled, a)


def pool_general(
    taus: torch.Tensor,
    merge_at: Any,
    lambdas: list[float],
    pooling: str,
    choice: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool A* by evaluating ``merge_at(lambda_i)`` once per lambda, one merged tensor at a time."""
    n_taus = taus.shape[0]
    if pooling == "average":
        total = taus.sum(dim=0)
        for lam in lambdas:
            total += merge_at(lam)
        return total / (n_taus + len(lambdas))
    if pooling == "random":
        assert choice is not None
        out = torch.gather(taus, 0, choice.clamp(max=n_taus - 1).unsqueeze(0)).squeeze(0)
        for i, lam in enumerate(lambdas):
            picked = choice == n_taus + i
            out = torch.where(picked, merge_at(lam), out)
        return out
    out = max_magnitude(taus)
    for lam in lambdas:
        candidate = merge_at(lam)
        out = torch.where(candidate.abs() >= out.abs(), candidate, out)
    return out


@dataclass(frozen=True)
class WeaveRecord:
    """What one weave call leaves for the late patches: the inner method's record, and ``a``, ``b`` at the
    entries that record says may be patched (its ``waiting`` flat indices, as TIES' ``Vote``), or ``None``."""

    inner: Any
    waiting: torch.Tensor | None = None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None


class WeaveLate:
    """The inner method's late patches, gathered as it would gather them, and re-pooled: ``g`` at the entries
    it corrects is replaced by its final value."""

    def __init__(self, inner: Late, pooling: str):
        self.inner, self.pooling = inner, pooling
        self.records: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.pool = BlockPool()  # holds the records off the heap
        self._lock = threading.Lock()

    def absorb(self, name: str, record: WeaveRecord) -> None:
        self.inner.absorb(name, record.inner)
        if record.waiting is not None and record.a is not None and record.b is not None:
            with self._lock:
                kept = (self.pool.keep(record.waiting), self.pool.keep(record.a), self.pool.keep(record.b))
                self.records.setdefault(name, []).append(kept)

    def patches(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for name, (index, g) in self.inner.patches().items():
            parts = self.records[name]
            where = torch.cat([p[0] for p in parts])
            a, b = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
            order = torch.argsort(where)
            pos = order[torch.searchsorted(where[order], index.to(where.dtype))]
            scaled = b[pos] * g.to(b.dtype)
            out[name] = (index, _larger(a[pos], scaled) if self.pooling == "magmax" else a[pos] + scaled)
        return out


def _late(hp: dict[str, Any], stats: WeaveStats | None) -> WeaveLate | None:
    inner, inner_hp = split(hp)
    inner_late = inner.gatherer({**inner_hp, "scaling": 1.0}, stats.inner) if stats is not None else None
    return WeaveLate(inner_late, hp["pooling"]) if inner_late is not None else None


def _record(inner: Any, ctx: TensorCtx, a: torch.Tensor, b: torch.Tensor) -> WeaveRecord:
    """The inner method's record, with ``a``, ``b`` kept at the entries it may patch."""
    waiting = getattr(inner, "waiting", None)
    if waiting is None:
        return WeaveRecord(inner)
    local = waiting.to(a.device) - ctx.offset
    return WeaveRecord(inner, waiting, a.reshape(-1)[local].cpu(), b.reshape(-1)[local].cpu())


@register(
    "weave",
    defaults=OWN,
    choices=CHOICES,
    summary="Weight Weaving: pool the task vectors and the inner method's merges over a lambda search space",
    source="Chaves et al. (Weight Weaving) Algorithm 1, pooling functions Sec. 5.3; lambda search spaces "
    "(presets multitask / continual / domain_generalization) from its Sec. 4; + the inner method's hyperparameters",
    resolution=Resolution(resolver=resolve, presets={preset: _describe(preset) for preset in PRESETS},
                          inner_compat=lambda hp: get_method(hp["inner"]).compat),
    randomized=True,
    streaming=Streaming(stats=_stats, late=_late),
    elementwise=Elementwise(when=_elementwise),
    whole_tensors=WholeTensors(parallel=_tensor_parallel),
)
def weave(taus: torch.Tensor, base: torch.Tensor, ctx: TensorCtx, **hp: Any) -> torch.Tensor:
    inner, inner_hp = split(hp)
    lambdas, pooling = hp["lambdas"], hp["pooling"]
    n_all = taus.shape[0] + len(lambdas)
    choice = random_choice(base.shape, n_all, ctx, taus.device) if pooling == "random" else None
    stats: WeaveStats | None = ctx.stats
    inner_ctx = copy.copy(ctx)
    inner_ctx.stats = stats.inner if stats is not None else None
    if inner.linear_in_scaling and hp["path"] == "auto":
        g = inner.fn(taus, base, inner_ctx, **inner_hp, scaling=1.0)
        pooled, a, b = pool_linear(taus, g, lambdas, pooling, choice)
        if inner_ctx.late is not None:  # the inner method's late patches will re-pool a few entries
            ctx.late = _record(inner_ctx.late, ctx, a, b)
        return pooled

    def merge_at(lam: float) -> torch.Tensor:  # inner methods with accumulating statistics take the linear path
        return inner.fn(taus, base, inner_ctx, **inner_hp, scaling=lam)

    return pool_general(taus, merge_at, lambdas, pooling, choice)
