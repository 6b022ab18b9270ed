"""OPCM: hand-checked projection steps, the norm invariant, and an oracle port of the official code."""

from __future__ import annotations

import torch

import mergelab
from mergelab.continual.rules.opcm import adaptive_lambda, project_out, split_rank
from tests.helpers import assert_close, finetune_of, tiny_state


def official_opcm(base: dict, models: list[dict], alpha: float) -> dict:
    """Literal port of FusionBench fusion_bench/method/opcm/opcm.py (OPCMForCLIP.run,
    merge_linear_weights, merge_other_parameters), every 2-D tensor treated as a Linear weight."""
    names = [n for n, t in base.items() if t.is_floating_point()]

    def tv_norm(model):
        return torch.linalg.norm(torch.cat([(model[n].double() - base[n].double()).reshape(-1) for n in names]))

    merged = {n: models[0][n].double().clone() for n in names}
    norms = [tv_norm(models[0])]
    previous_lambda = 1.0
    for task in models[1:]:
        norms.append(tv_norm(task))
        avg = sum(norms) / len(norms)
        for n in names:
            pre, tau, prev_tv = base[n].double(), task[n].double() - base[n].double(), merged[n] - base[n].double()
            if pre.dim() == 2:
                u, s, vh = torch.linalg.svd(prev_tv, full_matrices=True)
                v = vh.T
                r = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
                p = u.T @ tau @ v
                p.diagonal().fill_(0)
                p[:r, :r] = 0
                tau = u @ p @ v.T
            merged[n] = pre + (previous_lambda * prev_tv + tau) / 1.0
        norm = tv_norm(merged)
        lam = norm / avg
        for n in names:
            merged[n] = base[n].double() + (merged[n] - base[n].double()) * (avg / norm)
        previous_lambda = lam
    return merged


def test_matches_official_code():
    base = tiny_state(0)
    models = [finetune_of(base, i) for i in range(5)]
    expected = official_opcm(base, models, alpha=0.5)
    cm = mergelab.ContinualMerger("opcm", base, alpha=0.5)
    for model in models:
        cm.add(model)
    merged = cm.merged()
    for name, tensor in expected.items():
        assert_close(merged[name], tensor.float(), rtol=1e-4, atol=1e-5)
    assert torch.equal(merged["position_ids"], base["position_ids"])


def test_orthogonal_task_vector_passes_unchanged():
    # merged tv lives in the top-left 2x2 block; the new one in the bottom-right: orthogonal subspaces
    merged = torch.zeros(4, 4)
    merged[0, 0], merged[1, 1] = 3.0, 1.0
    tau = torch.zeros(4, 4)
    tau[2, 3], tau[3, 2] = 0.5, -0.7
    for projection in ("official", "paper"):
        assert_close(project_out(merged, tau, 0.5, projection), tau)


def test_task_vector_inside_kept_subspace_is_removed():
    merged = torch.diag(torch.tensor([3.0, 1.0, 0.0]))
    tau = torch.zeros(3, 3)
    tau[0, 0] = 2.0  # along the dominant singular direction
    assert_close(project_out(merged, tau, 0.5, "paper"), torch.zeros(3, 3))
    assert_close(project_out(merged, tau, 0.5, "official"), torch.zeros(3, 3))  # diagonal zeroed


def test_split_rank_official_vs_paper():
    s = torch.tensor([3.0, 1.0])  # cumulative ratios 0.75, 1.0
    assert split_rank(s, 0.5, "official") == 0  # first index with ratio > alpha is 0
    assert split_rank(s, 0.5, "paper") == 1  # minimal rank with ratio >= alpha
    assert split_rank(torch.zeros(3), 0.5, "official") == 0


def test_reduced_svd_equals_full_matrix_computation():
    gen = torch.Generator().manual_seed(0)
    for shape in ((5, 3), (3, 5), (4, 4)):
        merged, tau = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        u, s, vh = torch.linalg.svd(merged.double(), full_matrices=True)
        r = split_rank(s, 0.5, "official")
        p = u.T @ tau.double() @ vh.T
        p.diagonal().fill_(0)
        p[:r, :r] = 0
        assert_close(project_out(merged, tau, 0.5, "official"), (u @ p @ vh).float(), rtol=1e-5, atol=1e-5)


def test_norm_of_merged_task_vector_is_average_task_vector_norm():
    base = tiny_state(1)
    models = [finetune_of(base, i, scale=0.05 * (i + 1)) for i in range(4)]
    names = [n for n, t in base.items() if t.is_floating_point()]

    def norm(model):
        return float(torch.cat([(model[n] - base[n]).double().reshape(-1) for n in names]).norm())

    cm = mergelab.ContinualMerger("opcm", base)
    for t, model in enumerate(models, 1):
        cm.add(model)
        average = sum(norm(m) for m in models[:t]) / t
        assert abs(norm(cm.merged()) - average) < 1e-4 * average


def test_first_model_is_returned_unchanged():
    base = tiny_state(2)
    model = finetune_of(base, 0)
    cm = mergelab.ContinualMerger("opcm", base)
    cm.add(model)
    for name in base:
        assert_close(cm.merged()[name], model[name])


def test_sqrt_lambda_divides_the_same_state_by_sqrt_t():
    # the state (lambda_t * tau_merged) does not depend on the lambda rule; sqrt reads it off / sqrt(t)
    base = tiny_state(3)
    models = [finetune_of(base, i) for i in range(3)]
    adaptive, root = (mergelab.ContinualMerger("opcm", base, lambda_t=rule) for rule in ("adaptive", "sqrt"))
    for model in models:
        adaptive.add(model)
        root.add(model)
    lam = adaptive_lambda(adaptive.scalars, 3)
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            continue
        state = (adaptive.merged()[name] - tensor) * lam  # undo Eq. (10)'s read-out
        assert_close(root.merged()[name] - tensor, state / 3 ** 0.5, rtol=1e-4, atol=1e-6)


def test_adaptive_lambda_is_sqrt_t_for_orthogonal_equal_norm_task_vectors():
    # t orthogonal task vectors of equal norm: no projection needed, ||sum|| = sqrt(t) * ||tau||
    base = {"w": torch.zeros(4, 4)}
    cm = mergelab.ContinualMerger("opcm", base)
    for t in range(4):
        tau = torch.zeros(4, 4)
        tau[t, t] = 2.0
        cm.add({"w": tau})
        assert abs(adaptive_lambda(cm.scalars, t + 1) - (t + 1) ** 0.5) < 1e-6
    assert adaptive_lambda({"norm_sum": 0.0, "state_norm_sq": 0.0}, 1) == 0.0
