"""Method registry: a merging method is a pure function registered under a lower-case name.

A method computes the *merged task vector* of one tensor::

    fn(taus, base, ctx, **hparams) -> delta      # merged = base + delta

``taus`` is the stacked task vectors ``(T, *shape)`` of that tensor (``models[t] - base``) in the
compute dtype on the compute device, ``base`` the base tensor in the same dtype, ``ctx`` a
:class:`TensorCtx`. A method does no I/O, chooses no device and never touches the global RNG.

A simple method declares its name, source and hyperparameters and nothing else (:func:`merge_method`).
What the engine needs beyond the function is declared as capabilities (:class:`Method`):
:class:`Elementwise` (column chunks), :class:`Streaming` (whole-model statistics passes before the merge
pass, handed to the method as ``ctx.stats``; late patches after it, from what each call leaves in
``ctx.late``), :class:`WholeTensors` (peak temporaries, several tensors at once), a compiled ``fused``
path, and :class:`Resolution` (presets, another method's hyperparameters).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mergelab.errors import MergelabError


@dataclass
class TensorCtx:
    """What a method may know about the tensor it merges.

    Attributes:
        name: the tensor's name in the checkpoint.
        stats: the result of the method's statistics passes, or ``None``.
        seed: the user's seed for randomised methods.
        offset: for ``elementwise`` methods, which get the tensor flattened and in column chunks,
            the flat index of the chunk's first element within the tensor.
        notes: what the method found out about this tensor, for the engine to report once per merge
            (the spectral methods' numerical rank: ``ops.spectral.note_rank``, ``ops.spectral.rank_report``).
        late: set by a method with late patches (``Method.late``): what this call leaves for them (TIES: its
            :class:`~mergelab.ops.majority.Vote`); the engine hands it to the merge's :class:`Late`.
    """

    name: str
    stats: Any = None
    seed: int = 0
    offset: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    late: Any = None

    def generator(self, salt: str = "") -> torch.Generator:
        """A CPU generator seeded by ``(seed, crc32(name + salt))``: same draws on CPU and GPU, any order."""
        from mergelab.ops.rng import tensor_generator

        return tensor_generator(self.seed, self.name + salt)


class Collector(Protocol):
    """A streaming statistics pass (or several) over every floating tensor of the model."""

    @property
    def n_passes(self) -> int:
        """Passes still planned; re-read after each pass (it may change as the data is seen)."""

    def observe(self, pass_index: int, name: str, taus: torch.Tensor, base: torch.Tensor) -> None: ...

    def end_pass(self, pass_index: int) -> None: ...

    def result(self) -> Any: ...


class Late(Protocol):
    """A method's late patches: what each merged chunk left in ``ctx.late``, absorbed (from any thread) during
    the merge pass; after it, ``{name: (flat_indices, delta_values)}`` to write over those entries."""

    def absorb(self, name: str, record: Any) -> None: ...

    def patches(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]: ...


MethodFn = Callable[..., torch.Tensor]
Hparams = dict[str, Any]


@dataclass(frozen=True)
class Elementwise:
    """Capability: each output element depends only on the same element of every task vector (and
    ``ctx.stats``). The engine then streams flattened column chunks ``(T, c)`` through ``fn``, the collector
    and ``fused`` (``ctx.offset``: where the chunk starts), so temporaries stay small and cache-resident, and
    on CPU merges a tensor's chunks on several threads.

    Attributes:
        when: ``when(hparams) -> bool`` for a method elementwise under some hyperparameters only (TIES'
            global scope); ``None``: always.
    """

    when: Callable[[Hparams], bool] | None = None


@dataclass(frozen=True)
class Streaming:
    """Capability: whole-model quantities, learned in streaming passes over every tensor.

    Attributes:
        stats: ``stats(hparams, n_models) -> Collector | None``: statistics passes before the merge pass (TIES'
            model-wide top-k); the collector's ``result()`` is the method's ``ctx.stats``.
        late: ``late(hparams, stats) -> Late | None``, for a method that learns a model-wide quantity *while*
            merging (TIES' majority sign): a fresh :class:`Late` per merge pass absorbs what each call left in
            ``ctx.late``; after the pass the engine writes its patches over those few entries of the output.
            A record naming the entries it may patch as ``waiting`` flat indices (TIES' ``Vote``) lets Weight
            Weaving re-pool exactly those.
    """

    stats: Callable[[Hparams, int], Collector | None] | None = None
    late: Callable[[Hparams, Any], Late | None] | None = None


@dataclass(frozen=True)
class WholeTensors:
    """Capability of a method that merges whole tensors (not ``Elementwise``): its memory and parallelism.

    Attributes:
        temporaries: ``temporaries(hparams, n_models)``: how many arrays of the largest tensor's size (in the
            compute dtype) the method holds at its peak, for the plan's peak-RAM estimate; ``None``:
            ``n_models + 4`` (the task vectors, the base, ~3 more).
        parallel: several whole tensors may be merged at once on CPU, each on one torch thread (the engine
            picks how many: torch's thread count, capped by memory), for methods whose per-tensor work is long
            and releases the GIL (the SVD methods: one LAPACK call per core scales better than one call on
            every core). Only where ``fn`` is pure and the method has no ``Streaming``; a bool or
            ``f(hparams) -> bool``.
    """

    temporaries: Callable[[Hparams, int], int] | None = None
    parallel: bool | Callable[[Hparams], bool] = False


@dataclass(frozen=True)
class Resolution:
    """Hyperparameters resolved beyond "defaults overlaid with the user's values".

    Attributes:
        presets: named settings the ``preset`` hyperparameter selects, as shown by ``mergelab methods``.
        fill_presets: ``fill_presets(resolved) -> resolved`` puts the chosen preset's values in place of the
            hyperparameters left ``None`` (CART's ``rank_ratio`` / ``scaling``), so that the plan, the
            output's metadata and the experiment store show the values a merge really uses.
        resolver: ``resolver(hparams, n_models) -> resolved`` replaces the default resolution, for
            methods that take another method's hyperparameters too (``weave``).
        inner_compat: ``inner_compat(resolved) -> compat`` of the other method whose hyperparameters the
            resolver took in (weave: its inner method's ``compat``), so they keep their identity here too.
    """

    presets: Mapping[str, Any] = field(default_factory=dict)
    fill_presets: Callable[[Hparams], Hparams] | None = None
    resolver: Callable[[Mapping[str, Any], int], Hparams] | None = None
    inner_compat: Callable[[Hparams], Mapping[str, Any]] | None = None


@dataclass(frozen=True)
class Method:
    """A registered merging method: its function, hyperparameters and documentation, two facts about its
    maths, and the capabilities the engine needs to know of (none for a simple method).

    Attributes:
        name: registry key, the same string in the CLI, YAML and docs.
        fn: the per-tensor function (see module docstring).
        defaults: every hyperparameter with its default; no others are accepted.
        summary: one line for ``mergelab methods``.
        source: paper and official code followed, with the source of the defaults.
        choices: allowed values of string hyperparameters.
        check: ``check(hparams, n_models)`` validates resolved hyperparameters, raising ``ValueError``.
        linear_in_scaling: output is ``scaling * g(taus)`` with ``g`` independent of ``scaling``
            (declared, not guessed from the name; Weight Weaving's closed form relies on it).
        randomized: uses ``ctx.generator()``; reproducible for a given ``seed``.
        elementwise: :class:`Elementwise`: merged in column chunks.
        streaming: :class:`Streaming`: statistics passes before the merge pass, late patches after it.
        whole_tensors: :class:`WholeTensors`: peak temporaries, several tensors merged at once.
        fused: ``fused(base, models, out, ctx, **hparams) -> bool``: an optional compiled fast path on CPU
            in float32 (:mod:`mergelab.ops.native`). It gets one column chunk's (``elementwise``) or
            the whole tensor's *stored* values (flat, storage dtype) and writes ``base + delta`` into
            ``out`` (the output chunk, in the base's dtype), returning True; False leaves it to ``fn``. It
            must give the same result as ``fn`` (up to float summation order) and leave the same ``ctx.late``.
            A collector may likewise offer ``observe_raw(pass_index, name, base, models) -> bool``.
        resolution: :class:`Resolution`: presets, or another method's hyperparameters.
        compat: hyperparameters added after experiment results were first stored, each with the value that
            gives the behaviour from before it existed: a run at that value keeps the identity (hash) it had,
            so stored results stay valid (:mod:`mergelab.experiment.config`).
    """

    name: str
    fn: MethodFn
    defaults: Mapping[str, Any]
    summary: str
    source: str
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    check: Callable[[Hparams, int], None] | None = None
    linear_in_scaling: bool = False
    randomized: bool = False
    elementwise: Elementwise | None = None
    streaming: Streaming | None = None
    whole_tensors: WholeTensors | None = None
    fused: Callable[..., bool] | None = None
    resolution: Resolution | None = None
    compat: Mapping[str, Any] = field(default_factory=dict)

    def resolve(self, hparams: Mapping[str, Any], n_models: int, *, presets: bool = True) -> Hparams:
        """Defaults overlaid with ``hparams``, type-checked and validated; raises MergelabError.

        With ``presets`` (default) the values a preset chooses are filled in (see ``Resolution.fill_presets``);
        ``presets=False`` keeps them ``None``, as declared (what experiment run hashes are made of).
        """
        how = self.resolution or Resolution()
        if how.resolver is not None:
            resolved = how.resolver(hparams, n_models)
        else:
            resolved = resolve_hparams(self.name, self.defaults, self.choices, self.check, hparams, n_models)
        if presets and how.fill_presets is not None:
            resolved = how.fill_presets(resolved)
        return resolved

    def compat_of(self, resolved: Hparams) -> Mapping[str, Any]:
        """``compat`` for these resolved hyperparameters: the method's own and, through ``Resolution.inner_compat``,
        the other method's whose hyperparameters it took in."""
        inner = self.resolution.inner_compat if self.resolution is not None else None
        return {**(inner(resolved) if inner is not None else {}), **self.compat}

    @property
    def presets(self) -> Mapping[str, Any]:
        return self.resolution.presets if self.resolution is not None else {}

    def is_elementwise(self, hparams: Hparams) -> bool:
        if self.elementwise is None:
            return False
        return self.elementwise.when is None or bool(self.elementwise.when(hparams))

    def is_tensor_parallel(self, hparams: Hparams) -> bool:
        parallel = self.whole_tensors.parallel if self.whole_tensors is not None else False
        return bool(parallel(hparams) if callable(parallel) else parallel)

    def temporaries(self, hparams: Hparams, n_models: int) -> int:
        """Whole-tensor temporaries at the method's peak, in arrays of the largest tensor (see :class:`WholeTensors`)."""
        count = self.whole_tensors.temporaries if self.whole_tensors is not None else None
        return count(hparams, n_models) if count is not None else n_models + 4

    def collector(self, hparams: Hparams, n_models: int) -> Collector | None:
        stats = self.streaming.stats if self.streaming is not None else None
        return stats(hparams, n_models) if stats is not None else None

    @property
    def corrects_late(self) -> bool:
        """Whether the method may declare late patches (:class:`Streaming` ``late``)."""
        return self.streaming is not None and self.streaming.late is not None

    def gatherer(self, hparams: Hparams, stats: Any) -> Late | None:
        """A fresh :class:`Late` for one merge pass, or ``None`` (no late patches)."""
        late = self.streaming.late if self.streaming is not None else None
        return late(hparams, stats) if late is not None else None


def resolve_hparams(
    name: str,
    defaults: Mapping[str, Any],
    choices: Mapping[str, tuple[Any, ...]],
    check: Callable[[dict[str, Any], int], None] | None,
    hparams: Mapping[str, Any],
    n_models: int,
) -> dict[str, Any]:
    """``defaults`` overlaid with ``hparams``: unknown names, wrong types, values outside
    ``choices`` and ``check`` failures raise MergelabError naming the method."""
    unknown = sorted(set(hparams) - set(defaults))
    if unknown:
        known = ", ".join(sorted(defaults)) or "none"
        raise MergelabError(
            f"method '{name}' has no hyperparameter {', '.join(map(repr, unknown))} (it takes: {known})"
        )
    resolved = dict(defaults)
    for key, value in hparams.items():
        resolved[key] = _coerce(name, key, value, defaults[key])
    for key, allowed in choices.items():
        if resolved[key] not in allowed:
            raise MergelabError(f"method '{name}': {key}={resolved[key]!r} is not one of {', '.join(map(repr, allowed))}")
    if check is not None:
        try:
            check(resolved, n_models)
        except ValueError as err:
            raise MergelabError(f"method '{name}': {err}") from None
    return resolved


def _coerce(method: str, key: str, value: Any, default: Any) -> Any:
    """Accept ints for floats and nothing else surprising; ``None`` defaults accept anything."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(default, str) and isinstance(value, str):
        return value
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return list(value)
    raise MergelabError(
        f"method '{method}': {key}={value!r} should be a {type(default).__name__}, like the default {default!r}"
    )


_REGISTRY: dict[str, Method] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def identity_hparams(resolved: Mapping[str, Any], compat: Mapping[str, Any]) -> Hparams:
    """The hyperparameters that identify a stored run: ``resolved`` less the options added later that sit at
    the value which behaves as before they existed (``compat``), so runs stored before them are still found."""
    return {k: v for k, v in resolved.items() if not (k in compat and compat[k] == v)}


def register(name: str, **spec: Any) -> Callable[[MethodFn], MethodFn]:
    """Decorator: register ``fn`` as method ``name`` (lower case, unique)."""

    def decorate(fn: MethodFn) -> MethodFn:
        if not _NAME.match(name):
            raise ValueError(f"method name {name!r} must be lower case letters, digits and '_'")
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = Method(name=name, fn=fn, **spec)
        return fn

    return decorate


def merge_method(name: str, reference_url: str, **spec: Any) -> Callable[[MethodFn], MethodFn]:
    """Decorator for the simple case (after mergekit's ``@merge_method(name, reference_url)``): register ``fn``
    as method ``name`` with the hyperparameters and defaults of its keyword-only parameters, the first line
    of its docstring as the summary and ``reference_url`` as the source. Anything else :class:`Method` takes
    (``check``, ``choices``, ``linear_in_scaling``, ``elementwise=Elementwise()``, ...) may be added."""

    def decorate(fn: MethodFn) -> MethodFn:
        params = inspect.signature(fn).parameters.values()
        defaults = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        missing = [key for key, value in defaults.items() if value is inspect.Parameter.empty]
        if missing:
            raise ValueError(f"method {name!r}: hyperparameter(s) {', '.join(missing)} need a default")
        summary = (inspect.getdoc(fn) or "").strip().split("\n")[0]
        if not summary:
            raise ValueError(f"method {name!r}: the first line of its docstring is its summary")
        return register(name, defaults=defaults, summary=summary, source=reference_url, **spec)(fn)

    return decorate


def get_method(name: str) -> Method:
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MergelabError(
            f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def all_methods() -> dict[str, Method]:
    _load_builtin_methods()
    return dict(sorted(_REGISTRY.items()))


def _load_builtin_methods() -> None:
    import mergelab.methods  # noqa: F401  (importing the package registers every built-in method)
