"""What a search is and what it found: its spec (hashed: a rerun of the same search reuses its stored
trials), each trial, the result, and the rows of the experiment store they are kept as."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab.experiment.config import canonical_json
from mergelab.experiment.store import Row
from mergelab.search.space import Dim

OBJECTIVES = ("mean", "normalized")


@dataclass(frozen=True)
class SearchSpec:
    """What identifies a search (its trials' rows): everything but the number of trials, so that a search
    run again with more trials continues the same sequence."""

    name: str
    method: str
    suite: str
    tasks: list[str]
    params: dict[str, Any]
    space: dict[str, Dim]
    strategy: str
    seed: int
    objective: str
    batch: int
    zoo: dict[str, Any]

    def key(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "suite": self.suite, "tasks": self.tasks,
                "params": self.params, "space": {n: d.to_json() for n, d in self.space.items()},
                "strategy": self.strategy, "seed": self.seed, "objective": self.objective, "batch": self.batch,
                "zoo": self.zoo}

    @property
    def hash(self) -> str:
        return hashlib.sha256(canonical_json(self.key()).encode()).hexdigest()[:16]

    def row_hash(self, what: str) -> str:
        return hashlib.sha256(f"{self.hash}:{what}".encode()).hexdigest()[:16]


@dataclass
class Trial:
    """One evaluated candidate: ``score`` is the objective on the validation split (None: it failed)."""

    number: int
    params: dict[str, Any]
    score: float | None
    metrics: dict[str, Any] | None
    error: str | None = None
    reused: bool = False  # found in the store, not computed by this call


@dataclass
class SearchResult:
    """A finished search: the best trial's hyperparameters and validation score, and, reported apart, its
    accuracy on the test split."""

    spec: SearchSpec
    db: Path
    trials: list[Trial]
    best: Trial | None
    test: dict[str, Any] | None  # accuracy, average, (normalized, normalized_average) on the test rows
    job: Path | None
    out: Path | None
    merges: int = 0  # full merges this call did (the linear fast path shares one between scalings)
    errors: list[str] = field(default_factory=list)

    @property
    def best_params(self) -> dict[str, Any]:
        return {**self.spec.params, **(self.best.params if self.best else {})}

    @property
    def ran(self) -> int:
        return sum(not t.reused for t in self.trials)


def objective_of(metrics: Mapping[str, Any], objective: str) -> float:
    return float(metrics["average"] if objective == "mean" else metrics["normalized_average"])


# --- one trial: pure in its inputs, so that it runs here or on a Ray worker ------------------------------


def best_trial(trials: list[Trial]) -> Trial | None:
    """The trial of highest score; the earliest among equals."""
    done = [t for t in trials if t.score is not None]
    return max(done, key=lambda t: (t.score, -t.number)) if done else None


def trial_row(spec: SearchSpec, trial: Trial, outcome: dict[str, Any], common: dict[str, Any]) -> Row:
    shown = " ".join(f"{k}={v}" for k, v in trial.params.items())
    config = {"search": spec.key(), "search_hash": spec.hash, "trial": trial.number, "params": trial.params}
    if "same_as" in outcome:
        config["same_as"] = outcome["same_as"]
    metrics = None if trial.metrics is None else {**trial.metrics, "score": trial.score}
    return Row(hash=spec.row_hash(f"trial:{trial.number}"), experiment=spec.name, kind="search", suite=spec.suite,
               method=spec.method, label=f"trial {trial.number}: {shown}", config=config,
               status="ok" if trial.error is None else "failed", metrics=metrics, error=trial.error,
               merge_seconds=round(outcome["merge_seconds"], 3), eval_seconds=round(outcome["eval_seconds"], 3),
               created=now(), **common)


def trial_of(row: Row) -> Trial:
    metrics = row.metrics
    score = None if metrics is None else float(metrics["score"])
    return Trial(int(row.config["trial"]), dict(row.config["params"]), score, metrics, row.error, reused=True)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
