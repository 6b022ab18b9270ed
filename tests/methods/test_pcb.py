"""PCB: literal ports of the four official copies as oracles, a hand-checked case, and properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergelab
from mergelab.methods.pcb import VARIANTS, PcbStats, balancing, pcb
from mergelab.methods.registry import TensorCtx
from tests.helpers import assert_close, finetune_of, tiny_state

# --- literal ports of https://github.com/duguodong7/pcb-merging (commit 5897888) -----------------
# normalize / clamp / act are identical in pcb-merging.py:7-29, nlp_source_code/utils/merge_utils.py:103-125,
# vision_source_code/pcb.py:56-78 and vision_source_code/pcb_ES.py:63-85 (2-D branch of clamp only).


def normalize(x, dim=0):
    min_values, _ = torch.min(x, dim=dim, keepdim=True)
    max_values, _ = torch.max(x, dim=dim, keepdim=True)
    y = (x - min_values) / (max_values - min_values)
    return y


def clamp(x, min_ratio=0, max_ratio=0):
    d = x.size(1)
    sorted_x, _ = torch.sort(x, dim=1)
    min = sorted_x[:, int(d * min_ratio)].unsqueeze(1)  # official names
    max = sorted_x[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
    clamped_x = torch.clamp(x, min, max)
    return clamped_x


def act(x):
    return torch.tanh(x)


def PCB_merge(flat_task_checks, pcb_ratio=0.1):  # pcb-merging.py:31-45
    all_checks = flat_task_checks.clone()
    n, d = all_checks.shape
    all_checks_abs = clamp(torch.abs(all_checks), min_ratio=0.0001, max_ratio=0.0001)
    clamped_all_checks = torch.sign(all_checks) * all_checks_abs
    self_pcb = normalize(all_checks_abs, 1) ** 2
    self_pcb_act = torch.exp(n * self_pcb)
    cross_pcb = all_checks * torch.sum(all_checks, dim=0)
    cross_pcb_act = act(cross_pcb)
    task_pcb = self_pcb_act * cross_pcb_act
    scale = normalize(clamp(task_pcb, 1 - pcb_ratio, 0), dim=1)
    tvs = clamped_all_checks
    merged_tv = torch.sum(tvs * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)
    return merged_tv, clamped_all_checks, scale


def task_para_att_merge(flat_task_checks, att_ratio=0.1):  # nlp_source_code/utils/merge_utils.py:434-448
    all_checks = flat_task_checks.clone()
    n, d = all_checks.shape
    all_checks_abs = clamp(torch.abs(all_checks), min_ratio=0.01, max_ratio=0.01)
    clamped_all_checks = torch.sign(all_checks) * all_checks_abs
    self_att = normalize(all_checks_abs, 1) ** 2
    self_att_act = torch.exp(n * self_att)
    cross_att = all_checks * torch.sum(all_checks, dim=0)
    cross_att_act = act(cross_att)
    task_att = self_att_act * cross_att_act
    scale = normalize(clamp(task_att, 1 - att_ratio, 0), dim=1)
    tvs = clamped_all_checks
    merged_tv = torch.sum(tvs * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)
    return merged_tv, clamped_all_checks, scale


def vision_main(all_checks, att_ratio, lams):  # vision_source_code/pcb.py:81-105 (__main__ block)
    n, d = all_checks.shape
    all_checks_abs = clamp(torch.abs(all_checks), min_ratio=0.01, max_ratio=0.01)
    clamped_all_checks = torch.sign(all_checks) * all_checks_abs
    all_checks_normalized = torch.sign(all_checks) * normalize(all_checks_abs, dim=1)
    intra = normalize(all_checks_abs, 1) ** 2
    intra = torch.exp(n * intra)
    inter = all_checks * torch.sum(all_checks_normalized, dim=0)
    inter = act(inter)
    balancing = intra * inter
    scale = normalize(clamp(balancing, 1 - att_ratio, 0), dim=1)
    tvs = clamped_all_checks * lams
    merged_tv = torch.sum(tvs * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)
    return merged_tv


def PCB(all_checks, pcb_ratio):  # vision_source_code/pcb_ES.py:15-31
    n, d = all_checks.shape
    all_checks_abs = clamp(torch.abs(all_checks), min_ratio=0.01, max_ratio=0.01)
    clamped_all_checks = torch.sign(all_checks) * all_checks_abs
    all_checks_normalized = torch.sign(all_checks) * normalize(all_checks_abs, dim=1)
    intra = normalize(all_checks_abs, 1) ** 2
    intra = torch.exp(n * intra)
    inter_score = []
    for i in range(n):
        score_i = torch.tanh(all_checks_normalized[i] * all_checks_normalized)
        inter_i = torch.sum(score_i, dim=0)
        inter_score.append(inter_i)
    inter = torch.vstack(inter_score)
    balancing = intra * inter
    scale = normalize(clamp(balancing, 1 - pcb_ratio, 0), dim=1)
    return clamped_all_checks, scale


def official_delta(flat: torch.Tensor, variant: str, ratio: float, lam: float) -> torch.Tensor:
    """The merged task vector each official script adds to the flattened pre-trained weights."""
    if variant == "root":
        return lam * PCB_merge(flat, pcb_ratio=ratio)[0]  # lambda after the mean, as nlp merging.py:351
    if variant == "nlp":
        return lam * task_para_att_merge(flat, att_ratio=ratio)[0]  # nlp_source_code/merging.py:342-351
    if variant == "vision":
        return vision_main(flat, ratio, torch.full((flat.shape[0], 1), lam))
    clamped_all_checks, scale = PCB(flat, pcb_ratio=ratio)
    tvs = clamped_all_checks * torch.tensor([lam] * flat.shape[0]).unsqueeze(1)  # pcb_ES.py:36-37 (compute_acc)
    return torch.sum(tvs * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)


# --- fixtures ---------------------------------------------------------------------------------


def model_trio(seed: int):
    """~1.5k parameters: the 1 % quantiles clip ~15 entries at each end, the 0.01 % ones one at the top."""
    base = tiny_state(seed)
    bigger = {k: (v.repeat(20, *([1] * (v.dim() - 1))) if v.dim() else v) for k, v in base.items()}
    return bigger, [finetune_of(bigger, seed + i) for i in range(3)]


def flatten(state: dict, base: dict, names: list[str]) -> torch.Tensor:
    return torch.cat([(state[n] - base[n]).reshape(-1) for n in names])


FLOATING = [n for n, t in tiny_state(0).items() if t.is_floating_point()]

# --- hand-checked --------------------------------------------------------------------------------


def hand_case() -> torch.Tensor:
    # two task vectors of d = 4; every variant clips |tau| to [sorted[0], sorted[int(4 * 0.99 - 1)] = sorted[2]]
    # (root: int(4 * 0.9999 - 1) = 2 too):  row 0 |.| = 1 2 3 4 -> [1, 3]: c0 = 1 2 3 3, Norm = 0 .5 1 1
    #                                         row 1 |.| = 2 1 1 .5 -> [.5, 1]: c1 = 1 1 1 .5, Norm = 1 1 1 0
    # ratio 0.5: drop threshold = sorted(scores)[int(4 * 0.5)] = 3rd smallest, so each row keeps only its
    # top score, with weight 1. nlp/root: tau_0 * sum = 3 2 6 18, tau_1 * sum = 6 -1 -2 2.25;
    #   scores_0 = tanh3, e^.5 tanh2, e^2 tanh6, e^2 tanh18 -> top p3; scores_1 = e^2 tanh6, <0, <0, tanh2.25 -> top p0.
    # vision: sum_j s_j = 1 .5 0 1 -> scores_0 = .76, -1.26, 0, e^2 tanh4 (top p3); scores_1 top e^2 tanh2 at p0.
    # vision_es: inter_0 = 0, tanh.25 - tanh.5, 0, tanh1 (top p3); inter_1 = tanh1, tanh1 - tanh.5, 0, 0 (top p0).
    # merged: p0 = c1[0] = 1 (row 1 only), p1 = p2 = 0 (no weight), p3 = c0[3] = 3 (clipped from 4).
    return torch.tensor([[1.0, -2.0, 3.0, 4.0], [2.0, 1.0, -1.0, 0.5]])


@pytest.mark.parametrize("variant", VARIANTS)
def test_hand_checked_tiny_case(variant):
    taus = hand_case()
    out = pcb(taus, torch.zeros(4), TensorCtx("w"), ratio=0.5, scaling=2.0, variant=variant, scope="tensor")
    assert_close(out, torch.tensor([2.0, 0.0, 0.0, 6.0]))
    base = {"w": torch.zeros(4)}
    merged = mergelab.merge("pcb", base, [{"w": taus[0]}, {"w": taus[1]}], ratio=0.5, scaling=2.0, variant=variant)
    assert_close(merged["w"], torch.tensor([2.0, 0.0, 0.0, 6.0]))
    assert_close(official_delta(taus, variant, 0.5, 2.0), torch.tensor([2.0, 0.0, 0.0, 6.0]))


# --- oracle equivalence ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_streamed_global_equals_official(variant, monkeypatch):
    from mergelab.engine import chunks

    monkeypatch.setitem(chunks.CHUNK_ELEMENTS, "cpu", 64)  # many chunks per tensor, tensors split across chunks
    base, models = model_trio(0)
    flat = torch.stack([flatten(m, base, FLOATING) for m in models])
    flat_ptm = torch.cat([base[n].reshape(-1) for n in FLOATING])
    expected = flat_ptm + official_delta(flat, variant, 0.1, 1.2)  # merged_check = flat_ptm + merged_tv
    merged = mergelab.merge("pcb", base, models, ratio=0.1, variant=variant, scaling=1.2)
    got = torch.cat([merged[n].reshape(-1) for n in FLOATING])
    assert_close(got, expected)  # bit for bit on x86 CPUs; a tolerance in case vector-tail kernels differ
    assert torch.equal(merged["position_ids"], base["position_ids"])
    assert list(merged) == list(base)


def test_collector_quantiles_equal_sorted_flattened_vectors():
    base, models = model_trio(3)
    flat = torch.stack([flatten(m, base, FLOATING) for m in models])
    d = flat.shape[1]
    stats = PcbStats({"ratio": 0.05, "variant": "vision_es"}, 3)
    for index in range(stats.n_passes):
        for name in FLOATING:  # one chunk per tensor, in any order
            stats.observe(index, name, torch.stack([m[name] - base[name] for m in models]), base[name])
        stats.end_pass(index)
    bounds, score_bounds = stats.result()
    magnitudes = flat.abs().sort(dim=1).values
    assert torch.equal(bounds[:, 0].float(), magnitudes[:, int(d * 0.01)])
    assert torch.equal(bounds[:, 1].float(), magnitudes[:, int(d * 0.99 - 1)])
    scores = balancing(flat, bounds[:, :1].float(), bounds[:, 1:].float(), "vision_es").sort(dim=1).values
    assert_close(score_bounds[:, 0].float(), scores[:, int(d * (1 - 0.05))])  # exact selection; the scores
    assert_close(score_bounds[:, 1].float(), scores[:, -1])  # themselves may differ by an ulp per chunking


@pytest.mark.parametrize("variant", VARIANTS)
def test_tensor_scope_equals_official_per_tensor(variant):
    base, models = model_trio(1)
    merged = mergelab.merge("pcb", base, models, scope="tensor", ratio=0.2, variant=variant)
    for name in ("embed.weight", "layer.0.attn.weight", "layer.0.mlp.weight", "layer.0.attn.bias"):
        flat = torch.stack([(m[name] - base[name]).reshape(-1) for m in models])
        expected = official_delta(flat, variant, 0.2, 1.0)
        assert not expected.isnan().any()
        assert_close(merged[name], base[name] + expected.reshape(base[name].shape))


def test_variants_differ_and_default_is_vision_es():
    base, models = model_trio(2)
    outs = {v: flatten(mergelab.merge("pcb", base, models, variant=v), base, FLOATING) for v in VARIANTS}
    for i, a in enumerate(VARIANTS):
        for b in VARIANTS[i + 1 :]:
            assert not torch.allclose(outs[a], outs[b]), (a, b)
    default = flatten(mergelab.merge("pcb", base, models), base, FLOATING)
    assert torch.equal(default, outs["vision_es"])


def test_statistics_passes_and_ratio_check():
    base, models = model_trio(0)
    assert mergelab.plan("pcb", base, models).n_stat_passes == 4
    assert mergelab.plan("pcb", base, models, scope="tensor").n_stat_passes == 0
    for bad in (0.0, 1.5):
        with pytest.raises(mergelab.MergelabError, match="ratio"):
            mergelab.merge("pcb", base, models, ratio=bad)


# --- properties ------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_models=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    variant=st.sampled_from(VARIANTS),
    scope=st.sampled_from(["global", "tensor"]),
    ratio=st.floats(0.01, 1.0),
)
def test_properties(seed, n_models, dtype, variant, scope, ratio):
    base = tiny_state(seed, dtype)
    models = [finetune_of(base, seed + i) for i in range(n_models)]
    kwargs = dict(variant=variant, scope=scope, ratio=ratio)
    # all models equal to the base give the base; scaling 0 gives the base
    same = mergelab.merge("pcb", base, [base] * n_models, **kwargs)
    zero = mergelab.merge("pcb", base, models, scaling=0.0, **kwargs)
    merged = mergelab.merge("pcb", base, models, **kwargs)
    for name, tensor in base.items():
        assert torch.equal(same[name], tensor) and torch.equal(zero[name], tensor)
        # keys, shapes and dtypes kept; integer buffers copied
        assert merged[name].dtype == tensor.dtype and merged[name].shape == tensor.shape
        if not tensor.is_floating_point():
            assert torch.equal(merged[name], tensor)
    assert list(merged) == list(base) == list(same) == list(zero)
