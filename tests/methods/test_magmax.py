"""MagMax: by hand (ties go to the later task) and against the official code."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergelab
from mergelab.methods.magmax import max_magnitude
from tests.helpers import finetune_of, tiny_state


def official_merge_max_abs(taus: list[torch.Tensor]) -> torch.Tensor:
    """Port of danielm1405/magmax src/merging/task_vectors.py::merge_max_abs for one tensor."""
    best = taus[0]
    for current in taus[1:]:
        best = torch.where(current.abs() >= best.abs(), current, best)
    return best


def test_magmax_by_hand_with_ties_going_to_the_later_task():
    taus = torch.tensor([[1.0, -3.0, 2.0], [-2.0, 1.0, -2.0]])
    # |.|: p0 2 > 1 -> -2; p1 3 > 1 -> -3; p2 tie 2 == 2 -> later task: -2
    assert torch.equal(max_magnitude(taus), torch.tensor([-2.0, -3.0, -2.0]))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(0, 1000))
def test_magmax_matches_official_and_copies_give_the_model(n, seed):
    gen = torch.Generator().manual_seed(seed)
    taus = torch.randint(-3, 4, (n, 17), generator=gen).float()  # many ties
    assert torch.equal(max_magnitude(taus), official_merge_max_abs(list(taus)))
    base = tiny_state(seed)
    model = finetune_of(base, seed)
    merged = mergelab.merge("magmax", base, [model] * n, scaling=1.0)
    assert all(torch.equal(merged[k], model[k]) for k in base)
