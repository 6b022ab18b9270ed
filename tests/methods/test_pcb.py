"""PCB: the streamed model-wide result equals literal ports of the three official variants."""

from __future__ import annotations

import pytest
import torch

import mergelab
from conftest import assert_close, finetune_of, tiny_state


def _normalize(x, dim=0):
    lo, hi = torch.min(x, dim=dim, keepdim=True)[0], torch.max(x, dim=dim, keepdim=True)[0]
    return (x - lo) / (hi - lo)


def _clamp(x, min_ratio=0, max_ratio=0):
    d = x.size(1)
    s, _ = torch.sort(x, dim=1)
    return torch.clamp(x, s[:, int(d * min_ratio)].unsqueeze(1), s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1))


def official_pcb(flat: torch.Tensor, ratio: float, variant: str, lam: float = 1.0) -> torch.Tensor:
    """Ports of duguodong7/pcb-merging: vision_source_code/pcb.py (__main__ block), nlp_source_code/
    utils/merge_utils.py::task_para_att_merge and pcb-merging.py::PCB_merge."""
    n, d = flat.shape
    q = 0.0001 if variant == "root" else 0.01
    abs_c = _clamp(torch.abs(flat), min_ratio=q, max_ratio=q)
    clamped = torch.sign(flat) * abs_c
    intra = torch.exp(n * _normalize(abs_c, 1) ** 2)
    if variant == "vision":
        inter = flat * torch.sum(torch.sign(flat) * _normalize(abs_c, dim=1), dim=0)
    else:
        inter = flat * torch.sum(flat, dim=0)
    scale = _normalize(_clamp(intra * torch.tanh(inter), 1 - ratio, 0), dim=1)
    return torch.sum(clamped * lam * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)


def model_pair(seed: int):
    base = tiny_state(seed)
    bigger = {k: (v.repeat(20, *([1] * (v.dim() - 1))) if v.dim() else v) for k, v in base.items()}  # ~1.5k params
    return bigger, [finetune_of(bigger, seed + i) for i in range(3)]


@pytest.mark.parametrize("variant", ["vision", "nlp", "root"])
def test_streamed_global_equals_official(variant, monkeypatch):
    from mergelab.engine import stream

    monkeypatch.setitem(stream.CHUNK_ELEMENTS, "cpu", 64)  # several chunks per tensor
    base, models = model_pair(0)
    names = sorted(n for n, t in base.items() if t.is_floating_point())
    flat = torch.stack([torch.cat([(m[n] - base[n]).reshape(-1) for n in names]) for m in models])
    expected = official_pcb(flat, 0.1, variant, lam=1.2)
    merged = mergelab.merge("pcb", base, models, ratio=0.1, variant=variant, scaling=1.2)
    got = torch.cat([(merged[n] - base[n]).reshape(-1) for n in names])
    assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(merged["position_ids"], base["position_ids"])


def test_tensor_scope_equals_official_per_tensor():
    base, models = model_pair(1)
    merged = mergelab.merge("pcb", base, models, scope="tensor", ratio=0.2)
    name = "layer.0.mlp.weight"
    flat = torch.stack([(m[name] - base[name]).reshape(-1) for m in models])
    assert_close(merged[name], base[name] + official_pcb(flat, 0.2, "vision").reshape(base[name].shape), rtol=1e-4, atol=1e-6)


def test_copies_of_base_and_zero_scaling_give_base():
    base, models = model_pair(2)
    same = mergelab.merge("pcb", base, [base, base])
    zero = mergelab.merge("pcb", base, models, scaling=0.0)
    for name in base:
        assert torch.equal(same[name], base[name]) and torch.equal(zero[name], base[name])
