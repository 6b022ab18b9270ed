"""continual_ta, continual_ties and swa against their batch counterparts and official ports."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergelab
from mergelab.errors import MergelabError
from tests.helpers import assert_close, finetune_of, tiny_state


def run(method: str, base: dict, models: list[dict], **hp) -> dict:
    cm = mergelab.ContinualMerger(method, base, **hp)
    for model in models:
        cm.add(model)
    return cm.merged()


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 5), st.integers(0, 1000))
def test_swa_equals_weight_average_and_ta_equals_task_arithmetic(n, seed):
    base = tiny_state(seed)
    models = [finetune_of(base, seed + i) for i in range(n)]
    for name, tensor in run("swa", base, models).items():
        assert_close(tensor, mergelab.merge("weight_average", base, models)[name], rtol=1e-5, atol=1e-6)
    for name, tensor in run("continual_ta", base, models, scaling=0.4).items():
        assert_close(tensor, mergelab.merge("task_arithmetic", base, models, scaling=0.4)[name], rtol=1e-5, atol=1e-6)


def official_continual_ties(base: dict, models: list[dict], scaling: float, density: float, merge_func: str) -> dict:
    """Port of FusionBench fusion_bench/method/opcm/ties_merging.py (ContinualTiesMergingForCLIP.run)
    with the official TIES on the flattened [merged_tv, tau] rows."""
    names = [n for n, t in base.items() if t.is_floating_point()]
    flat = lambda sd: torch.cat([sd[n].reshape(-1) for n in names])  # noqa: E731
    merged = {n: base[n].clone() for n in names}
    for index, model in enumerate(models):
        tau = {n: model[n] - base[n] for n in names}
        if index == 0:
            step = tau
        else:
            rows = torch.stack([flat({n: merged[n] - base[n] for n in names}), flat(tau)])
            d = rows.shape[1]
            kth = rows.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
            trimmed = rows * (rows.abs() >= kth)
            sign = torch.sign(trimmed.sum(0))
            sign[sign == 0] = torch.sign(sign.sum())
            selected = trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)
            out = selected.sum(0) if merge_func == "sum" else selected.sum(0) / (selected != 0).sum(0).clamp(min=1)
            step, offset = {}, 0
            for n in names:
                step[n] = out[offset: offset + base[n].numel()].reshape(base[n].shape)
                offset += base[n].numel()
        merged = {n: merged[n] + scaling * step[n] for n in names}
    return merged


@pytest.mark.parametrize("merge_func", ["sum", "mean"])
def test_continual_ties_matches_fusionbench(merge_func):
    base = tiny_state(3)
    models = [finetune_of(base, i) for i in range(4)]
    expected = official_continual_ties(base, models, 0.5, 0.2, merge_func)
    merged = run("continual_ties", base, models, merge_func=merge_func)
    for name, tensor in expected.items():
        assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)


def test_duplicate_model_is_refused_unless_forced(tmp_path):
    base = tiny_state(4)
    model = finetune_of(base, 0)
    cm = mergelab.ContinualMerger("swa", base)
    cm.add(model)
    with pytest.raises(MergelabError, match="already added as step 1"):
        cm.add({k: v.clone() for k, v in model.items()})
    assert cm.step == 1
    cm.add(model, force=True)
    assert cm.step == 2


def test_bad_inputs_are_rejected():
    base = tiny_state(5)
    with pytest.raises(MergelabError, match="unknown continual method"):
        mergelab.ContinualMerger("nope", base)
    with pytest.raises(MergelabError, match="alpha must be in"):
        mergelab.ContinualMerger("opcm", base, alpha=2.0)
    with pytest.raises(MergelabError, match="no hyperparameter 'density'"):
        mergelab.ContinualMerger("opcm", base, density=0.2)
    cm = mergelab.ContinualMerger("opcm", base)
    with pytest.raises(MergelabError, match="no model added yet"):
        cm.merged()
    broken = finetune_of(base, 0)
    broken["layer.0.attn.bias"][2] = float("nan")
    with pytest.raises(MergelabError, match="NaN"):
        cm.add(broken)
    missing = {k: v for k, v in finetune_of(base, 1).items() if k != "head.scale"}
    with pytest.raises(MergelabError, match="head.scale"):
        cm.add(missing)
    assert cm.step == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(MergelabError, match="no CUDA GPU"):
        mergelab.ContinualMerger("opcm", tiny_state(0), device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["opcm", "continual_ta", "continual_ties", "swa"])
def test_gpu_equals_cpu(method):
    """``device="cuda"`` runs each add's maths (OPCM's SVDs included) on the GPU; the merged model equals
    the CPU one within float32 tolerance."""
    base = tiny_state(0)
    models = [finetune_of(base, i) for i in range(1, 5)]
    merged = {}
    for device in ("cpu", "cuda"):
        cm = mergelab.ContinualMerger(method, base, device=device)
        for model in models:
            cm.add(model)
        merged[device] = cm.merged()
    for name in base:
        assert merged["cuda"][name].device.type == "cpu" and merged["cuda"][name].dtype == base[name].dtype
        assert_close(merged["cuda"][name], merged["cpu"][name], rtol=1e-4, atol=1e-5)
