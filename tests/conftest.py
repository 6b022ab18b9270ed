"""Shared fixtures: a tiny base checkpoint and its fine-tunes (the helpers behind them: ``tests/helpers.py``)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import finetune_of, tiny_state


@pytest.fixture
def tiny_base() -> dict[str, torch.Tensor]:
    return tiny_state(0)


@pytest.fixture
def tiny_models(tiny_base: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [finetune_of(tiny_base, i) for i in range(3)]
