"""TIES: hand-checked cases, an oracle port of the official code, and properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergelab
from mergelab.methods.registry import TensorCtx
from mergelab.methods.ties import ties
from tests.helpers import assert_close, finetune_of, tiny_state


def official_ties(flat: torch.Tensor, density: float, merge_func: str) -> torch.Tensor:
    """Literal port of prateeky2806/ties-merging src/utils/merge_utils.py (topk_values_mask,
    resolve_sign "mass" + resolve_zero_signs "majority", disjoint_merge) on (T, d)."""
    n, d = flat.shape
    k = d - int(d * density)
    kth = flat.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    if merge_func == "mean":
        return selected.sum(dim=0) / (selected != 0).sum(dim=0).float().clamp(min=1)
    if merge_func == "sum":
        return selected.sum(dim=0)
    return selected.abs().max(dim=0)[0] * sign


def test_hand_checked_disjoint_mean():
    # three tasks, four parameters, density 0.5 of 4 -> keep |tau| >= 2nd smallest (official: 3 of 4)
    taus = torch.tensor([[1.0, -2.0, 3.0, 0.5], [2.0, 1.0, -4.0, 0.1], [-0.5, -3.0, 1.0, 2.0]])
    # row thresholds: kthvalue(4 - 2 = 2): row0 |.|={1,2,3,.5} -> 1; row1 {2,1,4,.1} -> 1; row2 {.5,3,1,2} -> 1
    # trimmed: [1,-2,3,0], [2,1,-4,0], [0,-3,1,2]
    # elected sign (sum): [3>0:+, -4<0:-, 0 -> majority, 2>0:+]; majority = sign(+1 -1 +0 +1) = +
    # disjoint mean: p0 mean(1,2)=1.5; p1 mean(-2,-3)=-2.5; p2 sign + -> mean(3,1)=2; p3 2
    out = ties(taus, torch.zeros(4), TensorCtx("w"), density=0.5, scaling=1.0, merge_func="mean",
               scope="tensor", threshold="official")
    assert_close(out, torch.tensor([1.5, -2.5, 2.0, 2.0]))


def test_exact_threshold_keeps_exactly_k():
    taus = torch.arange(1.0, 11.0).reshape(1, 10)
    for rule, expected in (("official", 3), ("exact", 2)):
        out = ties(taus, torch.zeros(10), TensorCtx("w"), density=0.2, scaling=1.0, merge_func="sum",
                   scope="tensor", threshold=rule)
        assert int((out != 0).sum()) == expected


def test_global_scope_equals_official_on_flattened_model():
    base = tiny_state(0)
    models = [finetune_of(base, i) for i in range(3)]
    names = [n for n, t in base.items() if t.is_floating_point()]
    flat = torch.stack([torch.cat([(m[n] - base[n]).reshape(-1) for n in names]) for m in models])
    for merge_func in ("mean", "sum", "max"):
        expected = official_ties(flat, 0.2, merge_func) * 0.7
        merged = mergelab.merge("ties", base, models, density=0.2, scaling=0.7, merge_func=merge_func)
        got = torch.cat([(merged[n] - base[n]).reshape(-1) for n in names])
        assert_close(got, expected)
        assert torch.equal(merged["position_ids"], base["position_ids"])


def test_tensor_scope_equals_official_per_tensor():
    base = tiny_state(1)
    models = [finetune_of(base, i) for i in range(4)]
    merged = mergelab.merge("ties", base, models, density=0.3, scope="tensor")
    for name, tensor in base.items():
        if not tensor.is_floating_point() or tensor.numel() < 2:
            continue
        flat = torch.stack([(m[name] - tensor).reshape(-1) for m in models])
        assert_close(merged[name], tensor + official_ties(flat, 0.3, "mean").reshape(tensor.shape))


def test_tensor_scope_radix_threshold_equals_official(monkeypatch):
    from mergelab.ops import sparsify as _common

    monkeypatch.setattr(_common, "_RADIX_MIN", 1)  # every tensor takes the radix selection, not kthvalue
    base = tiny_state(5)
    models = [finetune_of(base, i) for i in range(3)]
    for merge_func in ("mean", "sum", "max"):
        merged = mergelab.merge("ties", base, models, density=0.3, scope="tensor", merge_func=merge_func)
        for name, tensor in base.items():
            if tensor.is_floating_point() and tensor.numel() > 1:
                flat = torch.stack([(m[name] - tensor).reshape(-1) for m in models])
                expected = tensor + official_ties(flat, 0.3, merge_func).reshape(tensor.shape)
                assert torch.equal(merged[name], expected), (merge_func, name)


taus_with_ties = st.integers(1, 4).flatmap(  # repeated values and signed zeros
    lambda t: st.lists(st.floats(-4, 4, width=32) | st.sampled_from([0.0, -0.0, 1.0]), min_size=t * 7,
                       max_size=t * 7).map(lambda v: torch.tensor(v).reshape(t, 7))
)


@settings(max_examples=40, deadline=None, database=None)
@given(taus_with_ties, st.integers(0, 8))
def test_kth_threshold_radix_path_equals_kthvalue(taus, rank):
    from mergelab.ops import sparsify as _common

    magnitudes = taus.abs()
    expected = _common.kth_threshold(magnitudes, rank)  # tiny rows: kthvalue (or the 0 / d + 1 cases)
    original = _common._RADIX_MIN
    _common._RADIX_MIN = 1
    try:
        got = _common.kth_threshold(magnitudes, rank)
    finally:
        _common._RADIX_MIN = original
    assert torch.equal(got, expected)


def test_density_one_keeps_everything_like_sign_aware_mean():
    taus = torch.tensor([[1.0, -1.0], [3.0, 2.0]])
    out = ties(taus, torch.zeros(2), TensorCtx("w"), density=1.0, scaling=1.0, merge_func="mean",
               scope="tensor", threshold="official")
    # p0: both positive -> mean 2; p1: sum +1 -> keep 2.0 only
    assert_close(out, torch.tensor([2.0, 2.0]))


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_density_zero_exact_keeps_nothing_and_returns_the_base(scope):
    # exact rule, density 0: rank d + 1, nothing kept (global scope used to crash in its last statistics pass)
    base = tiny_state(0)
    merged = mergelab.merge("ties", base, [finetune_of(base, 1), finetune_of(base, 2)], density=0.0,
                            threshold="exact", scope=scope)
    assert all(torch.equal(merged[k], base[k]) for k in base)


small_taus = st.integers(1, 4).flatmap(
    lambda t: st.lists(st.floats(-4, 4, width=32), min_size=t * 6, max_size=t * 6).map(
        lambda v: torch.tensor(v).reshape(t, 6)
    )
)


@settings(max_examples=40, deadline=None)
@given(small_taus, st.sampled_from(["mean", "sum", "max"]), st.floats(0.05, 1.0))
def test_properties(taus, merge_func, density):
    ctx = TensorCtx("w")
    kwargs = dict(density=density, merge_func=merge_func, scope="tensor", threshold="official")
    out = ties(taus, torch.zeros(6), ctx, scaling=1.0, **kwargs)
    # linear in scaling; zero task vectors give zero; task order does not matter
    assert_close(ties(taus, torch.zeros(6), ctx, scaling=2.5, **kwargs), 2.5 * out)
    assert torch.equal(ties(torch.zeros_like(taus), torch.zeros(6), ctx, scaling=1.0, **kwargs), torch.zeros(6))
    perm = torch.randperm(taus.shape[0], generator=torch.Generator().manual_seed(0))
    assert_close(ties(taus[perm], torch.zeros(6), ctx, scaling=1.0, **kwargs), out)


def test_copies_of_one_model_return_it_with_mean():
    base = tiny_state(2)
    model = finetune_of(base, 0)
    merged = mergelab.merge("ties", base, [model, model, model], density=1.0, scope="tensor")
    for name in base:
        assert_close(merged[name], model[name])


def cancellation_case() -> tuple[dict, list[dict]]:
    """Parameter 0 cancels exactly (+1 and -1): its elected sign is the model-wide majority,
    which the other parameters make negative."""
    base = {"w": torch.zeros(6), "v": torch.zeros(2, 2)}
    a = {"w": torch.tensor([1.0, -2.0, -2.0, -2.0, -2.0, 0.5]), "v": -torch.ones(2, 2)}
    b = {"w": torch.tensor([-1.0, -1.0, -3.0, -1.0, -1.0, 0.25]), "v": -torch.ones(2, 2)}
    return base, [a, b]


def test_global_majority_sign_is_applied_to_cancelling_parameters(tmp_path):
    base, models = cancellation_case()
    flat = torch.stack([torch.cat([m["v"].reshape(-1), m["w"]]) for m in models])  # file order: v, w
    expected = official_ties(flat, 1.0 - 1e-9, "mean")
    assert expected[4] == -1.0  # parameter w[0]: majority -1 keeps the -1 entry
    merged = mergelab.merge("ties", base, models, density=1.0 - 1e-9)
    assert_close(torch.cat([merged["v"].reshape(-1), merged["w"]]), expected)
    path = mergelab.merge("ties", base, models, density=1.0 - 1e-9, out=tmp_path / "m.safetensors")
    from safetensors.torch import load_file

    written = load_file(str(path))
    assert_close(written["w"], merged["w"])
    assert not list(tmp_path.glob(".*mergelab-tmp*"))


def test_continual_ties_applies_the_majority_sign_too():
    base, models = cancellation_case()
    cm = mergelab.ContinualMerger("continual_ties", base, scaling=1.0, density=1.0 - 1e-9, merge_func="mean")
    cm.add(models[0])
    # state = tau_a; step 2 TIES([tau_a, tau_b]) has the same cancellation at w[0]
    cm.add(models[1])
    expected_step = official_ties(torch.stack([models[0]["w"], models[1]["w"]]), 1.0 - 1e-9, "mean")
    assert cm.merged()["w"][0] == models[0]["w"][0] + expected_step[0]


@pytest.mark.parametrize("threads", [1, 3])  # 3: the chunks are merged (and their pending patches kept) in parallel
def test_majority_patches_span_several_chunks(monkeypatch, threads):
    from mergelab.engine import chunks

    monkeypatch.setitem(chunks.CHUNK_ELEMENTS, "cpu", 2)  # w (6 elements) is merged in 3 chunks
    base, models = cancellation_case()
    models[0]["w"][5], models[1]["w"][5] = 0.75, -0.75  # a second cancellation, in another chunk
    models[0]["w"][3], models[1]["w"][3] = 0.5, -0.5  # and a third
    flat = torch.stack([torch.cat([m["v"].reshape(-1), m["w"]]) for m in models])
    expected = official_ties(flat, 1.0 - 1e-9, "mean")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        merged = mergelab.merge("ties", base, models, density=1.0 - 1e-9)
    finally:
        torch.set_num_threads(before)
    assert_close(torch.cat([merged["v"].reshape(-1), merged["w"]]), expected)
