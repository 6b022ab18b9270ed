"""DARE: seeded masks, kept density and rescaling, independence of tensor order."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergelab
from mergelab.errors import MergelabError
from mergelab.methods.dare import drop_and_rescale
from mergelab.methods.registry import TensorCtx
from tests.helpers import assert_close, finetune_of, tiny_state


def floats(state: dict) -> list[str]:
    return [n for n, t in state.items() if t.is_floating_point()]


# ----------------------------------------------------------------------------- DARE

@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 3))
def test_dare_seeded_reproducible_and_density_one_is_task_arithmetic(seed, n):
    base = tiny_state(seed)
    models = [finetune_of(base, seed + i) for i in range(n)]
    a = mergelab.merge("dare", base, models, seed=seed, density=0.6)
    b = mergelab.merge("dare", base, models, seed=seed, density=0.6)
    c = mergelab.merge("dare", base, models, seed=seed + 1, density=0.6)
    full = mergelab.merge("dare", base, models, density=1.0, scaling=0.7)
    ta = mergelab.merge("task_arithmetic", base, models, scaling=0.7)
    assert all(torch.equal(a[k], b[k]) for k in base)
    assert any(not torch.equal(a[k], c[k]) for k in floats(base))
    assert all(torch.equal(full[k], ta[k]) for k in base)


def test_dare_keeps_density_and_rescales():
    tau = torch.randn(1, 200_000)
    out = drop_and_rescale(tau, TensorCtx("w", seed=0), 0.3, True, "inverse")
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert_close(out[kept], tau[kept] / 0.3)
    l1 = drop_and_rescale(tau, TensorCtx("w", seed=0), 0.3, True, "l1")
    assert torch.equal(l1 != 0, kept)  # same mask, other scale
    assert_close(l1.abs().sum(), tau.abs().sum(), rtol=1e-4, atol=0)
    raw = drop_and_rescale(tau, TensorCtx("w", seed=0), 0.3, False, "inverse")
    assert_close(raw[kept], tau[kept])


def test_dare_masks_do_not_depend_on_tensor_order():
    base = tiny_state(0)
    models = [finetune_of(base, 1)]
    forward = mergelab.merge("dare", base, models, seed=5)
    reordered = mergelab.merge("dare", dict(reversed(list(base.items()))), [dict(reversed(list(models[0].items())))], seed=5)
    assert all(torch.equal(forward[k], reordered[k]) for k in base)


def test_dare_rejects_zero_density():
    base = tiny_state(0)
    with pytest.raises(MergelabError, match=r"density must be in \(0, 1\]"):
        mergelab.merge("dare", base, [base], density=0.0)


# ----------------------------------------------------------------------------- DARE-TIES
