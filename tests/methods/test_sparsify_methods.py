"""DARE, DARE-TIES, Breadcrumbs and MagMax: hand-checked values, official-code oracles, properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ties import official_ties

import mergelab
from conftest import assert_close, finetune_of, tiny_state
from mergelab.errors import MergelabError
from mergelab.methods.breadcrumbs import row_mask, tensor_mask
from mergelab.methods.dare import drop_and_rescale
from mergelab.methods.magmax import max_magnitude
from mergelab.methods.registry import TensorCtx


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
def test_dare_ties_is_official_ties_on_dropped_vectors():
    base = tiny_state(2)
    models = [finetune_of(base, i) for i in range(3)]
    names = floats(base)
    order = sorted(names)  # the engine's order for a state dict: by name
    dropped = {n: drop_and_rescale(torch.stack([m[n] - base[n] for m in models]), TensorCtx(n, seed=4), 0.5, True, "inverse")
               for n in names}
    flat = torch.cat([dropped[n].reshape(3, -1) for n in order], dim=1)
    expected = official_ties(flat, 0.2, "sum") * 0.5
    merged = mergelab.merge("dare_ties", base, models, seed=4)
    got = torch.cat([(merged[n] - base[n]).reshape(-1) for n in order])
    assert_close(got, expected)


# ----------------------------------------------------------------------------- Breadcrumbs
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


@pytest.mark.parametrize("method", ["dare", "dare_ties", "breadcrumbs", "magmax"])
def test_all_equal_to_base_and_zero_scaling_give_base(method):
    base = tiny_state(7)
    merged = mergelab.merge(method, base, [base, base])
    assert all(torch.equal(merged[k], base[k]) for k in base)
    zero = mergelab.merge(method, base, [finetune_of(base, 0), finetune_of(base, 1)], scaling=0.0)
    assert all(torch.equal(zero[k], base[k]) for k in base)
