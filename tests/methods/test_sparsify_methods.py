"""Properties every sparsifying method shares (DARE, DARE-TIES, Breadcrumbs, MagMax); each has its own
test file."""

from __future__ import annotations

import pytest
import torch

import mergelab
from tests.helpers import finetune_of, tiny_state


@pytest.mark.parametrize("method", ["dare", "dare_ties", "breadcrumbs", "magmax"])
def test_all_equal_to_base_and_zero_scaling_give_base(method):
    base = tiny_state(7)
    merged = mergelab.merge(method, base, [base, base])
    assert all(torch.equal(merged[k], base[k]) for k in base)
    zero = mergelab.merge(method, base, [finetune_of(base, 0), finetune_of(base, 1)], scaling=0.0)
    assert all(torch.equal(zero[k], base[k]) for k in base)
