"""The plan's peak-RAM estimate counts the whole-tensor temporaries a method declares."""

import torch

import mergelab


def test_plan_counts_the_temporaries_a_method_declares():
    """Per-tensor TIES declares 3T + 4 whole-tensor temporaries, breadcrumbs the generic T + 4: with the
    same inputs the two estimates differ by exactly 2T arrays of the largest tensor (float32)."""
    base = {"w": torch.zeros(100, 30), "b": torch.zeros(30)}
    models = [{"w": torch.randn(100, 30), "b": torch.randn(30)} for _ in range(3)]
    estimates = {}
    for method, hp in (("ties", {"scope": "tensor"}), ("breadcrumbs", {})):
        plan = mergelab.plan(method, base, models, **hp)
        estimates[method] = plan.peak_ram_bytes()
        plan.close()
    assert estimates["ties"] - estimates["breadcrumbs"] == 2 * 3 * 100 * 30 * 4
