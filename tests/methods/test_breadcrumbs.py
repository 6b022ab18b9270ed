"""Breadcrumbs: the official middle-keep mask, by hand and on task vectors full of zeros."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.methods.breadcrumbs import row_mask, tensor_mask
from tests.helpers import assert_close


def official_middle_keep(tensor: torch.Tensor, keep: float, remove: float) -> torch.Tensor:
    """Literal port of rezazzr/breadcrumbs src/task_vectors.py TaskVectorMiddleKeep (remove_first=True)."""
    if len(tensor.shape) == 0:
        return tensor
    k = int(tensor.shape[-1] * remove)
    _, idx = torch.topk(torch.abs(tensor), k)
    mask = torch.ones(tensor.shape)
    mask.scatter_(len(tensor.shape) - 1, idx, 0.0)
    tensor = mask * tensor
    k = int(tensor.shape[-1] * keep)
    _, idx = torch.topk(torch.abs(tensor), k)
    mask = torch.zeros(tensor.shape)
    mask.scatter_(len(tensor.shape) - 1, idx, 1)
    return mask * tensor


def test_breadcrumbs_row_scope_matches_official():
    gen = torch.Generator().manual_seed(0)
    for shape in ((7, 40), (40,), (), (3, 4, 50)):
        tau = torch.randn(shape, generator=gen)
        assert_close(tau * row_mask(tau, 0.3, 0.05), official_middle_keep(tau, 0.3, 0.05))


def test_breadcrumbs_by_hand_and_small_tensors_keep_their_task_vector():
    row = torch.tensor([1.0, -5.0, 3.0, 0.5, -2.0])
    # gamma 0.2 of 5 -> remove the largest (-5); density 0.4 -> keep the top 2 of the rest: 3, -2
    assert torch.equal(row * row_mask(row, 0.4, 0.2), torch.tensor([0.0, 0.0, 3.0, 0.0, -2.0]))
    bias = torch.tensor([0.3, -0.1, 0.2])
    # int(0.01 * 3) == 0 outliers: nothing is removed from the top (mergekit would drop all three)
    assert torch.equal(tensor_mask(bias, 0.7, 0.01), torch.tensor([True, False, True]))
    assert torch.equal(row_mask(bias, 0.7, 0.01), torch.tensor([True, False, True]))


def test_breadcrumbs_keeps_no_outlier_in_sparse_rows():
    # gamma 0.25 of 4 removes the 5; density 1.0 keeps all 4 positions of [0, 0, 1, 0], the outlier's
    # among them: the official code multiplies the outlier-zeroed row, so the 5 stays removed
    row = torch.tensor([5.0, 0.0, 1.0, 0.0])
    assert torch.equal(row * row_mask(row, 1.0, 0.25), torch.tensor([0.0, 0.0, 1.0, 0.0]))
    # fewer nonzeros than the kept count after removal: 2 of 10 nonzero, keep 5
    row = torch.tensor([0.0, 0.0, -4.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0])
    assert torch.equal(row * row_mask(row, 0.5, 0.1), official_middle_keep(row, 0.5, 0.1))
    assert float((row * row_mask(row, 0.5, 0.1)).abs().max()) == 0.5


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_breadcrumbs_matches_official_on_task_vectors_full_of_zeros(seed, zero_fraction, density, gamma):
    gen = torch.Generator().manual_seed(seed)
    tau = torch.randn(6, 33, generator=gen)
    tau[torch.rand(6, 33, generator=gen) < zero_fraction] = 0.0
    tau[2] = 0.0  # a frozen row
    assert torch.equal(tau * row_mask(tau, density, gamma), official_middle_keep(tau, density, gamma))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.floats(0.0, 1.0), st.floats(0.0, 0.5))
def test_breadcrumbs_tensor_scope_counts(n, density, gamma):
    tau = torch.randn(n, generator=torch.Generator().manual_seed(n)) + 10.0 * torch.sign(torch.randn(n))
    keep = tensor_mask(tau, density, gamma)
    n_top = min(int(gamma * n), n - int(density * n))
    assert int(keep.sum()) == int(density * n)
    if keep.any() and n_top:
        assert tau.abs()[keep].max() <= tau.abs().sort().values[n - n_top]


# ----------------------------------------------------------------------------- MagMax
