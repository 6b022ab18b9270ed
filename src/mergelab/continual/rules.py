"""Per-tensor update rules of the continual mergers, as pure functions over one tensor.

Each rule keeps a float32 *state* tensor per model tensor (never the past models) plus a few
scalars, and defines how the state starts, how a new task vector ``tau`` updates it, and how the
merged tensor is read off it:

* ``swa`` -- running average of the models (Izmailov et al. 2018; OPCM paper App. C, Eq. 33):
  state = mean of the task vectors so far; merged = base + state.
* ``continual_ta`` -- continual Task Arithmetic (OPCM paper App. C, Eq. 35; FusionBench
  ``method/opcm/task_arithmetic.py``): state = sum of task vectors; merged = base + scaling * state.
  Default scaling 0.3 (FusionBench ``config/method/opcm/task_arithmetic.yaml``).
* ``continual_ties`` -- continual TIES as FusionBench ``method/opcm/ties_merging.py``: step 1
  ``state = scaling * tau_1``; then ``state += scaling * TIES([state, tau_t])`` with the global
  (whole-model) top-k and majority sign of the official TIES code. Defaults ``scaling=0.5,
  density=0.2 (threshold 20), merge_func="sum"`` (FusionBench ``config/method/opcm/ties_merging.yaml``).
* ``opcm`` -- see :mod:`mergelab.continual.opcm`.
"""

from __future__ import annotations

import torch


def swa_update(state: torch.Tensor, tau: torch.Tensor, count: int) -> torch.Tensor:
    """Running mean after ``count`` previous models: ``state + (tau - state) / (count + 1)``."""
    return state + (tau - state) / (count + 1)


def ta_update(state: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    return state + tau
