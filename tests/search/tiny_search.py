"""A split-aware stand-in scorer for search tests, over the experiment tests' tiny zoo.

Validation accuracy of task ``t`` is :func:`experiment.tiny.score` over ``layer.attn.weight`` alone; test
accuracy is the same over every floating tensor. So the two splits give different, hand-checkable numbers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mergelab.zoo import Zoo
from tests.experiment.tiny import Scored

VALIDATION_TENSORS = ("layer.attn.weight",)


def split_score(model: dict[str, torch.Tensor], zoo: Zoo, task: str, split: str) -> float:
    def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
        names = [k for k in sorted(state) if state[k].is_floating_point()
                 and (split == "test" or k in VALIDATION_TENSORS)]
        return torch.cat([state[k].double().flatten() for k in names])

    base, expert = flat(load_file(str(zoo.base))), flat(load_file(str(zoo.experts[task])))
    model_state = model if isinstance(model, dict) else load_file(str(model))
    d_base = float((base - expert).norm())
    return d_base / (float((flat(model_state) - expert).norm()) + d_base)


class SplitScorer:
    """``evaluate(model, zoo, *, tasks, split, ...)``; raises ``fail_with`` on call ``fail_at`` (1-based);
    with ``die_once`` (a marker path), the first call in a process where the marker is absent creates it and
    kills the process (a worker dying mid-run)."""

    def __init__(self, fail_at: int | None = None, fail_with: BaseException | None = None,
                 die_once: Path | None = None):
        self.calls: list[str] = []
        self.fail_at, self.fail_with, self.die_once = fail_at, fail_with, die_once

    def __call__(self, model: Any, zoo: Zoo, *, tasks: list[str], split: str = "test", **_: Any) -> Scored:
        self.calls.append(split)
        if len(self.calls) == self.fail_at and self.fail_with is not None:
            raise self.fail_with
        if self.die_once is not None and not self.die_once.exists():
            self.die_once.write_text("died", encoding="utf-8")
            os._exit(1)
        return Scored({t: split_score(model, zoo, t, split) for t in tasks})
