"""Continual rules: how a merger's running state starts, takes one more task vector, and is read off --
registered like merge methods (name, defaults, choices, check, summary, source), validated by the same
code (:func:`mergelab.methods.registry.resolve_hparams`) and listed by ``mergelab methods``.

A rule keeps one float32 *state* tensor per floating tensor of the base (never the past models) and
declares, one tensor at a time::

    update(state, tau, ctx, **hparams) -> new state      # state is None for the first model
    read(state, ctx, **hparams) -> delta                 # merged = base + delta

``ctx`` (:class:`RuleCtx`) says which tensor it is, whether it is a matrix, how many models came
before, the merger's scalars and the rule's statistics. A rule that needs whole-model statistics over
the rows ``[state, tau]`` before the merge pass declares ``stats(hparams) -> Collector`` (run by the
merger as streaming passes, as the engine runs a method's) and ``late(hparams, stats) -> Late`` for
entries corrected after it: what each ``update`` leaves in ``ctx.late`` is absorbed during the merge
pass, and the patches (``{name: (flat_index, delta)}``) are added to the previous state there.

This package holds the registry (here) and one module per rule (:mod:`.swa`, :mod:`.continual_ta`,
:mod:`.continual_ties`, :mod:`.opcm`), each registering its rule when imported. :func:`all_rules` imports
every public module of the package, so a new rule is one more module, listed nowhere else.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mergelab.errors import MergelabError
from mergelab.methods.registry import Collector, Late, resolve_hparams


@dataclass
class RuleCtx:
    """What a rule may know about the tensor it updates or reads.

    Attributes:
        name: the tensor's name in the checkpoint.
        matrix: a 2-D tensor that the ``exclude`` hyperparameter (if the rule has one) does not exclude.
        count: models merged before this one (``update``) or in all (``read``).
        scalars: the merger's running scalars (``norm_sum``, ``state_norm_sq``), for ``read``.
        stats: the result of the rule's statistics passes for this step, or ``None``.
        late: set by ``update`` in a rule with ``late``: what it leaves for the late patches.
    """

    name: str
    matrix: bool
    count: int
    scalars: Mapping[str, float] = field(default_factory=dict)
    stats: Any = None
    late: Any = None


UpdateFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """A registered continual rule (see the module docstring).

    Attributes:
        in_norm: ``in_norm(ctx, hparams)``: whether the tensor counts in the norms the merger tracks
            (``norm_sum``, ``state_norm_sq``); every tensor unless the rule says otherwise.
        stats: factory of a :class:`~mergelab.methods.registry.Collector` over the rows ``[state, tau]``,
            run before each merge pass once a state exists; ``None``: no statistics.
        late: ``late(hparams, stats) -> Late``: a fresh :class:`~mergelab.methods.registry.Late` per merge
            pass, which absorbs what ``update`` left in ``ctx.late``; its patches
            (``{name: (flat_index, delta)}``) are applied after the pass.
        legacy: defaults of hyperparameters added after states were first saved: a state saved without
            one continues with this value (how it began), not the current default.
        compat: hyperparameters added after experiment results were first stored, with the value that
            gives the earlier behaviour: a run at that value keeps its identity (as :class:`Method`'s).
        step_record: ``step_record(scalars, count) -> {name: value}``: quantities of the merger's state
            that experiments record after every step (OPCM: its Eq. 10 ``lambda_t``).
    """

    name: str
    update: UpdateFn
    read: Callable[..., torch.Tensor]
    defaults: Mapping[str, Any]
    summary: str
    source: str
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    check: Callable[[dict[str, Any], int], None] | None = None
    in_norm: Callable[[RuleCtx, dict[str, Any]], bool] | None = None
    stats: Callable[[dict[str, Any]], Collector] | None = None
    late: Callable[[dict[str, Any], Any], Late] | None = None
    legacy: Mapping[str, Any] = field(default_factory=dict)
    compat: Mapping[str, Any] = field(default_factory=dict)
    step_record: Callable[[Mapping[str, float], int], dict[str, float]] | None = None

    def resolve(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``hparams``, checked as a merge method's are; raises MergelabError."""
        return resolve_hparams(self.name, self.defaults, self.choices, self.check, hparams, 1)

    def counts_in_norm(self, ctx: RuleCtx, hparams: dict[str, Any]) -> bool:
        return self.in_norm is None or self.in_norm(ctx, hparams)


_RULES: dict[str, Rule] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_rule(name: str, *, read: Callable[..., torch.Tensor], **spec: Any) -> Callable[[UpdateFn], UpdateFn]:
    """Decorator on a rule's ``update``: register it as continual rule ``name`` (lower case, unique; a
    merge method's name is taken too)."""

    def decorate(update: UpdateFn) -> UpdateFn:
        if not _NAME.match(name):
            raise ValueError(f"continual rule name {name!r} must be lower case letters, digits and '_'")
        if name in _RULES:
            raise ValueError(f"continual rule {name!r} is already registered")
        _RULES[name] = Rule(name=name, update=update, read=read, **spec)
        return update

    return decorate


def get_rule(name: str) -> Rule:
    rules = all_rules()
    if name not in rules:
        raise MergelabError(f"unknown continual method {name!r}; available: {', '.join(sorted(rules))}")
    return rules[name]


def all_rules() -> dict[str, Rule]:
    """Every registered rule, by name: the modules of this package first imported (those whose name starts
    with ``_`` hold helpers and register nothing)."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return dict(sorted(_RULES.items()))


def state_itself(state: torch.Tensor, ctx: RuleCtx, **hparams: Any) -> torch.Tensor:
    """The read-out of rules whose state is the merged task vector: ``merged = base + state``."""
    return state
