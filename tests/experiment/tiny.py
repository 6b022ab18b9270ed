"""Tiny stand-ins for the experiment and report tests: a zoo of real safetensors checkpoints (a base and one
expert per task, a few small tensors) and a deterministic scorer that counts its calls.

The scorer gives task ``t`` the accuracy ``d(base, e_t) / (d(merged, e_t) + d(base, e_t))`` with ``d`` the
Euclidean distance over all floating tensors: 1.0 for the expert itself, 0.5 for the base, and in between
for merges, so different methods and hyperparameters give different, hand-checkable numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mergelab.zoo import Task, Zoo

TASKS = ["alpha", "beta", "gamma", "delta"]


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"layer.attn.weight": torch.randn(6, 5, generator=gen), "layer.mlp.weight": torch.randn(4, 6, generator=gen),
            "layer.norm.bias": torch.randn(6, generator=gen), "position_ids": torch.arange(5)}


def write_zoo(folder: Path, tasks: list[str] | None = None, suite: str = "tiny") -> Zoo:
    """A base and one expert per task (base + seeded noise), as .safetensors files."""
    tasks = tasks or TASKS
    folder.mkdir(parents=True, exist_ok=True)
    base = tiny_state(0)
    save_file(base, str(folder / "base.safetensors"))
    experts = {}
    for i, task in enumerate(tasks):
        gen = torch.Generator().manual_seed(100 + i)
        state = {k: (v + 0.3 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v)
                 for k, v in base.items()}
        experts[task] = folder / f"{task}.safetensors"
        save_file(state, str(experts[task]))
    return Zoo(suite=suite, backbone="tiny", base=folder / "base.safetensors", experts=experts,
               tasks=[Task(t, ["no", "yes"]) for t in tasks], expert_accuracy={t: 0.8 for t in tasks})


class Zoos:
    """Zoo provider and suite-task lookup for tests: suites ``tiny`` (4 tasks) and ``pair`` (2 tasks)."""

    SUITES = {"tiny": TASKS, "pair": TASKS[:2]}

    def __init__(self, folder: Path):
        self.folder = folder
        self.builds = 0

    def tasks(self, suite: str, quick: bool) -> list[str]:
        from mergelab.errors import MergelabError

        if suite not in self.SUITES:
            raise MergelabError(f"unknown suite {suite!r}")
        return list(self.SUITES[suite])

    def build(self, suite: str, **_: Any) -> Zoo:
        self.builds += 1
        return write_zoo(self.folder / suite, self.SUITES[suite], suite)


@dataclass
class Scored:
    accuracy: dict[str, float]


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.double().flatten() for k, v in sorted(state.items()) if v.is_floating_point()])


def score(model: dict[str, torch.Tensor], zoo: Zoo, task: str) -> float:
    base = _flat(load_file(str(zoo.base)))
    expert = _flat(load_file(str(zoo.experts[task])))
    d_base = float((base - expert).norm())
    return d_base / (float((_flat(model) - expert).norm()) + d_base)


class Scorer:
    """``evaluate(model, zoo, *, tasks, ...)``; raises ``fail_with`` on call number ``fail_at`` (1-based)."""

    def __init__(self, fail_at: int | None = None, fail_with: BaseException | None = None):
        self.calls = 0
        self.fail_at, self.fail_with = fail_at, fail_with

    def __call__(self, model: Any, zoo: Zoo, *, tasks: list[str], **_: Any) -> Scored:
        self.calls += 1
        if self.calls == self.fail_at and self.fail_with is not None:
            raise self.fail_with
        return Scored({t: score(model, zoo, t) for t in tasks})
