"""Task arithmetic and weight averaging: hand-checked values and hypothesis properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergelab
from mergelab.errors import MergelabError
from tests.helpers import assert_close, finetune_of, tiny_state


def test_task_arithmetic_by_hand():
    base = {"w": torch.tensor([1.0, 2.0, 3.0])}
    models = [{"w": torch.tensor([2.0, 2.0, 1.0])}, {"w": torch.tensor([1.0, 4.0, 3.0])}]
    # taus: [1, 0, -2] and [0, 2, 0]; sum [1, 2, -2]; * 0.5 -> [0.5, 1, -1]
    merged = mergelab.merge("task_arithmetic", base, models, scaling=0.5)
    assert_close(merged["w"], torch.tensor([1.5, 3.0, 2.0]))


def test_weight_average_by_hand():
    base = {"w": torch.tensor([0.0, 0.0])}
    models = [{"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([3.0, 5.0])}]
    assert_close(mergelab.merge("weight_average", base, models)["w"], torch.tensor([2.0, 4.0]))
    # weights 1:3 -> 0.25 * [1,3] + 0.75 * [3,5] = [2.5, 4.5]
    assert_close(mergelab.merge("weight_average", base, models, weights=[1, 3])["w"], torch.tensor([2.5, 4.5]))


def test_weight_average_rejects_wrong_weights():
    base = {"w": torch.zeros(2)}
    with pytest.raises(MergelabError, match="weights must be a list of 2"):
        mergelab.merge("weight_average", base, [base, base], weights=[1.0])
    with pytest.raises(MergelabError, match="sum to zero"):
        mergelab.merge("weight_average", base, [base, base], weights=[1.0, -1.0])


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.floats(-2, 2), st.integers(0, 10_000))
def test_task_arithmetic_is_linear_in_scaling(n_models, scaling, seed):
    base = tiny_state(seed)
    models = [finetune_of(base, seed + i) for i in range(n_models)]
    one = mergelab.merge("task_arithmetic", base, models, scaling=1.0)
    scaled = mergelab.merge("task_arithmetic", base, models, scaling=scaling)
    for name, tensor in base.items():
        if tensor.is_floating_point():
            assert_close(scaled[name] - tensor, scaling * (one[name] - tensor), rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(scaled[name], tensor)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5), st.integers(0, 10_000), st.sampled_from(["weight_average", "task_arithmetic"]))
def test_copies_of_base_give_base_and_order_does_not_matter(n_models, seed, method):
    base = tiny_state(seed)
    same = mergelab.merge(method, base, [base] * n_models)
    for name in base:
        assert torch.equal(same[name], base[name])
    models = [finetune_of(base, seed + i) for i in range(n_models)]
    forward = mergelab.merge(method, base, models)
    backward = mergelab.merge(method, base, models[::-1])
    for name in base:
        assert_close(forward[name], backward[name])


def test_weight_average_of_copies_returns_the_model():
    base = tiny_state(3)
    model = finetune_of(base, 1)
    merged = mergelab.merge("weight_average", base, [model] * 4)
    for name in base:
        assert_close(merged[name], model[name])


def test_keys_and_dtypes_of_base_are_kept():
    base = tiny_state(4, dtype=torch.bfloat16)
    merged = mergelab.merge("task_arithmetic", base, [finetune_of(base, 0)])
    assert list(merged) == list(base)
    assert all(merged[n].dtype == base[n].dtype and merged[n].shape == base[n].shape for n in base)
