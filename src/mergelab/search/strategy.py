"""Which candidate a search tries next: the grid's next point, or optuna's TPE (seeded) given the trials so far.

Both are pure functions of the space, the seed, the trial's number and the finished trials before its batch,
so a resumed search, and a search whose trials run on Ray, proposes exactly the trials of an uninterrupted
local one. TPE gets a fresh sampler per trial seeded by ``(seed, number)``: its random state never depends
on how many proposals an earlier process made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mergelab.errors import MergelabError
from mergelab.search.space import Dim, _round, grid

STRATEGIES = ("grid", "tpe")


def propose(strategy: str, space: Mapping[str, Dim], number: int, seed: int,
            history: Sequence[tuple[dict[str, Any], float | None]]) -> dict[str, Any]:
    """The hyperparameters of trial ``number`` (0-based); ``history``: ``(params, score or None if failed)``
    of the trials finished before its batch."""
    if strategy == "grid":
        points = grid(space)
        if number >= len(points):
            raise MergelabError(f"the grid has {len(points)} points, no trial {number}")
        return points[number]
    if strategy == "tpe":
        return tpe(space, number, seed, history)
    raise MergelabError(f"unknown strategy {strategy!r} ({', '.join(STRATEGIES)})")


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise MergelabError("strategy 'tpe' needs optuna: pip install 'mergelab[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def distributions(space: Mapping[str, Dim]) -> dict[str, Any]:
    """Optuna distributions; choices are drawn as their index (any value, lists included, can be a choice)."""
    optuna = _optuna()
    out: dict[str, Any] = {}
    for name, dim in space.items():
        if dim.choices is not None:
            out[name] = optuna.distributions.CategoricalDistribution(list(range(len(dim.choices))))
        elif dim.integer:
            out[name] = optuna.distributions.IntDistribution(int(dim.low or 0), int(dim.high or 0), step=int(dim.step or 1))
        else:
            out[name] = optuna.distributions.FloatDistribution(float(dim.low or 0.0), float(dim.high or 0.0),
                                                               step=dim.step, log=dim.log)
    return out


def encode(space: Mapping[str, Dim], params: Mapping[str, Any]) -> dict[str, Any]:
    return {n: (list(d.choices).index(params[n]) if d.choices is not None else params[n]) for n, d in space.items()}


def decode(space: Mapping[str, Dim], values: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for name, dim in space.items():
        value = values[name]
        if dim.choices is not None:
            out[name] = dim.choices[value]
        elif dim.integer:
            out[name] = int(value)
        else:
            out[name] = _round(float(value)) if dim.step is not None else float(value)
    return out


def tpe(space: Mapping[str, Dim], number: int, seed: int,
        history: Sequence[tuple[dict[str, Any], float | None]]) -> dict[str, Any]:
    """Optuna's TPE (default settings: 10 random start-up trials) told ``history``, asked once."""
    optuna = _optuna()
    dists = distributions(space)
    sampler = optuna.samplers.TPESampler(seed=(seed * 1_000_003 + number) % 2**32)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for params, score in history:
        state = optuna.trial.TrialState.COMPLETE if score is not None else optuna.trial.TrialState.FAIL
        study.add_trial(optuna.trial.create_trial(params=encode(space, params), distributions=dists,
                                                  value=score, state=state))
    return decode(space, study.ask(dists).params)
