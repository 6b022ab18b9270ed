"""The linear fast path (one merge per family, recombined) equals a full merge per candidate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import mergelab
from mergelab.search.candidates import CandidateMerger, family
from tests.experiment.tiny import TASKS, write_zoo

CASES = [
    ("task_arithmetic", {"scaling": 0.3}), ("ties", {"scaling": 0.7, "density": 0.5}), ("tsv", {"scaling": 1.3}),
    ("dare", {"scaling": 0.4}), ("iso_c", {"scaling": 1.1}), ("magmax", {"scaling": 0.6}),
    ("breadcrumbs", {"scaling": 0.5}), ("pcb", {"scaling": 0.5}),
    ("weave", {"inner": "ties", "lambdas": [0.2, 0.5]}), ("weave", {"inner": "tsv", "lambdas": [0.5, 1.0, 2.0]}),
]


@pytest.mark.parametrize("method, params", CASES)
def test_fast_path_equals_the_plain_merge(tmp_path: Path, method: str, params: dict[str, Any]) -> None:
    zoo = write_zoo(tmp_path)
    models = [zoo.experts[t] for t in TASKS]
    fast = CandidateMerger(zoo.base, models)(method, params)
    plain = mergelab.merge(method, zoo.base, models, progress=False, **params)
    assert isinstance(plain, dict) and fast.keys() == plain.keys()
    for name, tensor in plain.items():
        assert fast[name].dtype == tensor.dtype
        if tensor.is_floating_point():  # float rounding only: the merge rounds to float32 in another order
            torch.testing.assert_close(fast[name], tensor, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(fast[name], tensor)


def test_a_lambda_sweep_costs_one_merge(tmp_path: Path) -> None:
    zoo = write_zoo(tmp_path)
    merger = CandidateMerger(zoo.base, [zoo.experts[t] for t in TASKS])
    for scaling in (0.1, 0.5, 0.9, 1.3):
        merger("ties", {"scaling": scaling, "density": 0.3})
    assert merger.merges == 1
    merger("ties", {"scaling": 0.5, "density": 0.5})  # another family: another merge
    assert merger.merges == 2
    for lambdas in ([0.1], [0.5, 1.0], [0.2, 0.4, 0.6]):  # weave's closed form: g (ties) and sum of taus
        merger("weave", {"inner": "ties", "density": 0.5, "lambdas": lambdas})
    assert merger.merges == 3  # the ties merge at density 0.5 is shared; + task arithmetic at 1
    plain = CandidateMerger(zoo.base, [zoo.experts[t] for t in TASKS], fast=False)
    plain("ties", {"scaling": 0.1})
    plain("ties", {"scaling": 0.2})
    assert plain.merges == 2


def test_families() -> None:
    assert family("ties", {"scaling": 0.4, "density": 0.2}) == ("scale", "ties", {"scaling": 1.0, "density": 0.2})
    assert family("cart", {"scaling": 0.4, "rank_ratio": 0.1}) is None  # affine in its scaling: full merges
    from mergelab.methods.registry import get_method

    woven = get_method("weave").resolve({"inner": "ties", "pooling": "magmax"}, 3)
    assert family("weave", woven) is None  # only average pooling has the closed form
