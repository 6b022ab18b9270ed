"""The adaptation's maths by hand: entropy, groups, the affine merged tensor, and the data-free special cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergelab
from mergelab.adapt.model import build
from mergelab.adapt.objective import entropy
from mergelab.errors import MergelabError
from mergelab.methods.registry import get_method
from mergelab.ops import adaptive as components
from mergelab.ops import coefficients as coef
from mergelab.ops.sparsify import disjoint_merge, elect_sign
from tests.helpers import finetune_of, tiny_state


def test_entropy_by_hand() -> None:
    values = entropy(torch.tensor([[0.0, 0.0], [5.0, 5.0], [math.log(3.0), 0.0]]))
    # p = (3/4, 1/4): H = -(3/4 ln 3/4 + 1/4 ln 1/4)
    assert values.tolist() == pytest.approx([math.log(2), math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))])
    assert entropy(torch.zeros(1, 5)).item() == pytest.approx(math.log(5))
    assert entropy(torch.tensor([[200.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_groups() -> None:
    names = ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
             "encoder.layer.0.output.dense.bias", "encoder.layer.11.output.dense.bias", "pooler.dense.weight"]
    assert coef.groups_of(names, "task") == ["all"]
    assert coef.groups_of(names, "layer") == names
    assert coef.groups_of(names, "block") == ["embeddings", "encoder.layer.0", "encoder.layer.11", "other"]
    assert coef.group_of("visual.transformer.resblocks.3.mlp.c_fc.weight", "block") == "visual.transformer.resblocks.3"


def test_combine_by_hand() -> None:
    deltas = torch.tensor([[1.0, 2.0], [10.0, 20.0]])
    assert components.combine(None, deltas, [0.5, 0.1]).tolist() == pytest.approx([1.5, 3.0])
    assert components.combine(torch.tensor([1.0, 1.0]), deltas, [1.0, 0.0]).tolist() == [2.0, 3.0]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 4), st.floats(0.05, 1.0), st.sampled_from([-1.0, 0.0, 1.0]))
def test_ties_selected_sum_is_ties_dis_sum(seed: int, n: int, density: float, majority: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    taus = torch.randn(n, 7, 3, generator=gen).round(decimals=1)  # ties and exact cancellations happen
    thresholds = components.ties_thresholds(components.flat_magnitudes([taus], n), density, "official")
    _, selected = components.ties_selected(taus, thresholds, majority)
    kept = components.trimmed(taus, thresholds)
    expected = disjoint_merge(kept, elect_sign(kept, majority), "sum").reshape(7, 3)
    assert torch.allclose(selected.sum(dim=0), expected, atol=1e-6)
    assert bool(((selected == 0) | (selected == taus)).all())  # entries are kept or dropped, never changed


def _models() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = tiny_state(0)
    return base, [finetune_of(base, s, scale=0.2) for s in range(3)]


@pytest.mark.parametrize(("method", "reference", "params"), [
    ("adamerging", "task_arithmetic", {}),
    ("adamerging_pp", "ties", {"merge_func": "sum"}),
    ("cart_pp", "cart", {"rank_ratio": 0.5}),
])
def test_equal_coefficients_are_the_data_free_method(method: str, reference: str, params: dict[str, object]) -> None:
    base, models = _models()
    extra = {"rank_ratio": 0.5} if method == "cart_pp" else {}
    adapted = mergelab.merge(method, base, models, init=0.7, **extra)
    plain = mergelab.merge(reference, base, models, scaling=0.7, **params)
    assert isinstance(adapted, dict) and isinstance(plain, dict)
    for name, tensor in plain.items():
        assert torch.allclose(adapted[name].double(), tensor.double(), atol=1e-6, rtol=1e-6), name


@pytest.mark.parametrize("method", ["adamerging", "adamerging_pp", "cart_pp"])
@pytest.mark.parametrize("granularity", ["layer", "block", "task"])
def test_differentiable_model_is_the_merge(method: str, granularity: str) -> None:
    """The weights the adaptation optimises are those ``mergelab merge`` writes from the coefficients."""
    base, models = _models()
    hp = get_method(method).resolve({"granularity": granularity, "rank_ratio": 0.5} if method == "cart_pp"
                                    else {"granularity": granularity}, 3)
    merged = build(method, hp, base, models)
    gen = torch.Generator().manual_seed(1)
    table = torch.rand(len(merged.groups), 3, generator=gen)
    payload = {"format": 1, "method": method, "hparams": hp, "tasks": ["a", "b", "c"],
               "coefficients": {g: table[i].tolist() for i, g in enumerate(merged.groups)}}
    written = mergelab.merge(method, base, models, coefficients=payload)
    assert isinstance(written, dict)
    weights = merged.weights(table)
    for name in merged.names:
        assert torch.allclose(weights[name], written[name], atol=1e-6), name
    assert torch.equal(written["position_ids"], base["position_ids"])


def test_bfloat16_deltas_accumulate_in_float32() -> None:
    base, models = _models()
    hp = get_method("adamerging").resolve({}, 3)
    exact, low = build("adamerging", hp, base, models), build("adamerging", hp, base, models, deltas_dtype="bfloat16")
    table = torch.full((len(exact.groups), 3), 0.3)
    for name in exact.names:
        a, b = exact.weights(table)[name], low.weights(table)[name]
        assert b.dtype == torch.float32 and torch.allclose(a, b, atol=3e-2)


def test_coefficients_file_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base, models = _models()
    with pytest.raises(MergelabError, match="no such coefficients file"):
        mergelab.merge("adamerging", base, models, coefficients=str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MergelabError, match="cannot read the coefficients"):
        mergelab.merge("adamerging", base, models, coefficients=str(tmp_path / "bad.json"))
    payload = {"format": 1, "method": "cart_pp", "hparams": {}, "tasks": ["a", "b", "c"], "coefficients": {"all": [1, 1, 1]}}
    with pytest.raises(MergelabError, match="learned by 'cart_pp', not 'adamerging'"):
        mergelab.merge("adamerging", base, models, coefficients=payload)
    with pytest.raises(MergelabError, match="for 3 models"):
        mergelab.merge("cart_pp", base, models[:2], coefficients=payload)
    payload = payload | {"method": "adamerging", "coefficients": {"all": [1, 1]}}
    with pytest.raises(MergelabError, match="need 3 finite numbers"):
        mergelab.merge("adamerging", base, models, coefficients=payload)
    payload = payload | {"hparams": {"granularity": "layer"}, "coefficients": {"embed.weight": [1, 1, 1]}}
    with pytest.raises(MergelabError, match="no group"):
        mergelab.merge("adamerging", base, models, coefficients=payload)
