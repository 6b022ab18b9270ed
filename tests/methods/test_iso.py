"""Iso-C and Iso-CTS: hand-checked cases, oracle ports of the official code, and properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergelab
from mergelab.errors import MergelabError
from mergelab.methods.iso_c import iso_c
from mergelab.methods.iso_cts import iso_cts, subspace_sizes
from mergelab.methods.registry import TensorCtx
from mergelab.ops.spectral import OFFICIAL_EXCLUDE
from tests.helpers import assert_close, finetune_of, tiny_state

# --- literal ports of https://github.com/danielm1405/iso-merging/blob/d34010a/src/utils/iso.py ------------
# (task_vector.vector[key] -> task_vector[key], config.DATASETS -> the task list, device -> CPU, prints dropped)


def official_iso_c(task_vectors: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        new_vector = {}
        for key in task_vectors[0]:
            tvs = [task_vector[key] for task_vector in task_vectors]
            new_vector[key] = sum(tvs) / len(tvs)
            if len(task_vectors[0][key].shape) == 2 and "text_projection" not in key:
                new_vector[key] *= len(tvs)
                U, S, V = torch.linalg.svd(new_vector[key], full_matrices=False)
                S_mean = torch.ones_like(S) * S.mean()
                new_vector[key] = torch.linalg.multi_dot((U, torch.diag(S_mean), V))
    return new_vector


@torch.no_grad()
def official_iso_cts(
    task_vectors: list[dict[str, torch.Tensor]], common_space_fraction: float
) -> dict[str, torch.Tensor]:
    n_tasks = len(task_vectors)
    new_vector = {}
    for key in task_vectors[0]:
        shape_ = task_vectors[0][key].shape
        is_2d_matrix = (len(shape_) == 2) and ("text_projection" not in key)
        if not is_2d_matrix:
            for i, task_vector in enumerate(task_vectors):
                vec = task_vector[key]
                if i == 0:
                    new_vector[key] = vec.clone()
                else:
                    new_vector[key] += (vec - new_vector[key]) / (i + 1)
            continue
        combined_w = sum([task_vector[key] for task_vector in task_vectors])
        common_space_index_s = int(min(shape_) * common_space_fraction)
        _task_specific_total_space_index_s = round((min(shape_) - common_space_index_s) / n_tasks) * n_tasks
        common_space_index_s = min(shape_) - _task_specific_total_space_index_s
        u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
        common_space_u = u[:, :common_space_index_s]
        common_space_s = s[:common_space_index_s]
        common_space_v = v[:common_space_index_s, :]
        n_dims_per_task = int((min(shape_) - common_space_index_s) / n_tasks)
        for i, task_vector in enumerate(task_vectors):
            w = task_vector[key]
            w_ts = w - common_space_u @ common_space_u.T @ w
            u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
            if i == 0:
                combined_space_u = torch.zeros_like(u_ts)
                combined_space_s = torch.zeros_like(s_ts)
                combined_space_v = torch.zeros_like(v_ts)
            combined_space_u[:, i * n_dims_per_task : (i + 1) * n_dims_per_task] = u_ts[:, :n_dims_per_task]
            combined_space_s[i * n_dims_per_task : (i + 1) * n_dims_per_task] = s_ts[:n_dims_per_task]
            combined_space_v[i * n_dims_per_task : (i + 1) * n_dims_per_task, :] = v_ts[:n_dims_per_task, :]
        end = n_tasks * n_dims_per_task
        combined_space_u[:, end : end + common_space_index_s] = common_space_u
        combined_space_s[end : end + common_space_index_s] = common_space_s
        combined_space_v[end : end + common_space_index_s, :] = common_space_v
        u_combined_space_u, s_combined_space_u, v_combined_space_u = torch.linalg.svd(
            combined_space_u, full_matrices=False
        )
        u_combined_space_v, s_combined_space_v, v_combined_space_v = torch.linalg.svd(
            combined_space_v, full_matrices=False
        )
        combined_space_u = u_combined_space_u @ v_combined_space_u
        combined_space_v = u_combined_space_v @ v_combined_space_v
        combined_space_s = torch.ones_like(combined_space_s) * combined_space_s.mean()
        new_vector[key] = torch.linalg.multi_dot((combined_space_u, torch.diag(combined_space_s), combined_space_v))
    return new_vector


def _call(method, taus, name="w", **hp):
    hp.setdefault("scaling", 1.0)
    hp.setdefault("exclude", [])
    hp.setdefault("svd_dtype", "float64")
    return method(taus, torch.zeros(taus.shape[1:], dtype=taus.dtype), TensorCtx(name), **hp)


def _random_task_vectors(n_tasks: int, shape: tuple[int, int], seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "a.weight": torch.randn(shape, generator=gen, dtype=torch.float64),
            "a.bias": torch.randn(shape[0], generator=gen, dtype=torch.float64),
            "text_projection": torch.randn(shape, generator=gen, dtype=torch.float64),
        }
        for _ in range(n_tasks)
    ]


def test_iso_c_by_hand():
    # tau_1 = 3 e1 e1^T, tau_2 = 1 e2 e2^T: sum = diag(3, 1), U = V = I, mean singular value 2 -> 2 I
    taus = torch.tensor([[[3.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    assert_close(_call(iso_c, taus), 2 * torch.eye(2))
    assert_close(_call(iso_c, taus, scaling=0.5), torch.eye(2))


def test_iso_c_spectrum_is_flat():
    taus = torch.randn(3, 7, 5)
    s_sum = torch.linalg.svdvals(taus.sum(dim=0).double())
    s_out = torch.linalg.svdvals(_call(iso_c, taus, scaling=1.5).double())
    assert_close(s_out, torch.full((5,), 1.5 * float(s_sum.mean()), dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_iso_c_rank_deficient_sum_keeps_only_its_directions():
    # sum of two rank-1 float64 matrices: rank 2 of 5. The official U V^T would add 3 directions
    # chosen arbitrarily by the SVD routine, each with the mean singular value; we keep rank 2,
    # both non-zero singular values equal to mean(s) over all 5 (as the official mean).
    gen = torch.Generator().manual_seed(3)
    taus = torch.stack(
        [
            torch.outer(
                torch.randn(7, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
            )
            for _ in range(2)
        ]
    )
    U, S, Vh = torch.linalg.svd(taus.sum(dim=0), full_matrices=False)
    out = _call(iso_c, taus, scaling=1.5)
    assert_close(out, 1.5 * S.mean() * U[:, :2] @ Vh[:2], rtol=1e-10, atol=1e-12)
    s_out = torch.linalg.svdvals(out)
    assert_close(s_out[:2], torch.full((2,), 1.5 * float(S.mean()), dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert float(s_out[2:].max()) < 1e-12


def test_iso_cts_spectrum_is_flat():
    taus = torch.randn(3, 9, 6, dtype=torch.float64)
    s_out = torch.linalg.svdvals(_call(iso_cts, taus, common_space_fraction=0.5))
    assert_close(s_out, s_out.mean().expand(6), rtol=1e-10, atol=1e-12)


def test_non_matrices_are_scaled_mean():
    taus = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
    for method, extra in ((iso_c, {}), (iso_cts, {"common_space_fraction": 0.8})):
        assert_close(_call(method, taus, scaling=0.5, **extra), torch.tensor([1.0, 0.0]))
        mats = torch.randn(2, 3, 3)
        assert_close(
            _call(method, mats, name="model.text_projection", exclude=OFFICIAL_EXCLUDE["iso_c"], **extra),
            mats.mean(dim=0),
        )


@pytest.mark.parametrize(
    "r,n_tasks,fraction,expected",
    [
        (768, 8, 0.8, (616, 19)),  # int(614.4) = 614; round(154 / 8 = 19.25) = 19 -> 152 task dims
        (6, 3, 0.8, (3, 1)),  # int(4.8) = 4; round(2 / 3) = 1 -> 3
        (10, 4, 0.0, (2, 2)),  # round(2.5) = 2 (half to even) -> 8
        (5, 2, 1.0, (5, 0)),  # fraction 1: everything common -> Iso-C
        (7, 2, 0.0, (1, 3)),  # official: round(3.5) = 4 -> 8 > 7, common -1; we round down to 6
    ],
)
def test_subspace_sizes(r, n_tasks, fraction, expected):
    assert subspace_sizes(r, n_tasks, fraction) == expected


@pytest.mark.parametrize("n_tasks,shape", [(2, (6, 6)), (3, (8, 5)), (3, (5, 8)), (4, (12, 10)), (1, (4, 3))])
def test_iso_c_matches_official_port(n_tasks, shape):
    tvs = _random_task_vectors(n_tasks, shape, seed=n_tasks * 10 + shape[0])
    expected = official_iso_c(tvs)
    for name in tvs[0]:
        taus = torch.stack([tv[name] for tv in tvs])
        assert_close(
            _call(iso_c, taus, name=name, exclude=OFFICIAL_EXCLUDE["iso_c"]), expected[name], rtol=1e-9, atol=1e-10
        )


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.2, 1.0])
@pytest.mark.parametrize("n_tasks,shape", [(2, (6, 6)), (3, (8, 5)), (3, (5, 8)), (4, (12, 10))])
def test_iso_cts_matches_official_port(n_tasks, shape, fraction):
    tvs = _random_task_vectors(n_tasks, shape, seed=n_tasks * 10 + shape[0])
    expected = official_iso_cts(tvs, fraction)
    for name in tvs[0]:
        taus = torch.stack([tv[name] for tv in tvs])
        out = _call(iso_cts, taus, name=name, exclude=OFFICIAL_EXCLUDE["iso_cts"], common_space_fraction=fraction)
        assert_close(out, expected[name], rtol=1e-9, atol=1e-10)


def test_iso_cts_with_everything_common_is_iso_c():
    taus = torch.randn(3, 7, 5, dtype=torch.float64)
    assert_close(_call(iso_cts, taus, common_space_fraction=1.0), _call(iso_c, taus), rtol=1e-10, atol=1e-12)


def test_public_api_and_bad_fraction():
    base = tiny_state(2)
    models = [finetune_of(base, i) for i in range(3)]
    for method in ("iso_c", "iso_cts"):
        merged = mergelab.merge(method, base=base, models=models)
        assert list(merged) == list(base)
        assert all(merged[n].dtype == base[n].dtype for n in base)
    with pytest.raises(MergelabError, match="common_space_fraction"):
        mergelab.merge("iso_cts", base, models, common_space_fraction=1.5)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5), st.integers(0, 10_000), st.sampled_from(["iso_c", "iso_cts"]))
def test_scaling_zero_and_copies_of_base_give_base(n_models, seed, method):
    base = tiny_state(seed)
    models = [finetune_of(base, seed + i) for i in range(n_models)]
    for merged in (mergelab.merge(method, base, models, scaling=0.0), mergelab.merge(method, base, [base] * n_models)):
        for name in base:
            assert torch.equal(merged[name], base[name])


@settings(max_examples=20, deadline=None)
@given(
    st.integers(2, 5), st.integers(0, 10_000), st.sampled_from(["iso_c", "iso_cts"]), st.randoms(use_true_random=False)
)
def test_task_order_does_not_matter(n_models, seed, method, rnd):
    base = tiny_state(seed)
    models = [finetune_of(base, seed + i) for i in range(n_models)]
    shuffled = models[:]
    rnd.shuffle(shuffled)
    hp = {"common_space_fraction": 0.5} if method == "iso_cts" else {}  # 0.5: non-empty task blocks for r=6, T<=5
    one = mergelab.merge(method, base, models, dtype="float64", **hp)
    two = mergelab.merge(method, base, shuffled, dtype="float64", **hp)
    for name in base:
        assert_close(one[name], two[name], rtol=1e-5, atol=1e-6)


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@settings(max_examples=20, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(0, 10_000),
    st.sampled_from(["generic", "zero_task", "duplicate", "cancel"]),
    st.sampled_from([0.8, 0.3]),
)
def test_rotation_equivariance(n_tasks, seed, kind, fraction):
    # f(Q tau_t R) = Q f(tau_t) R for orthogonal Q, R, also on rank-deficient stacks (no arbitrary basis)
    gen = torch.Generator().manual_seed(seed)
    taus = torch.randn(n_tasks, 9, 7, generator=gen, dtype=torch.float64)
    if kind == "zero_task":
        taus[0] = 0
    elif kind == "duplicate":
        taus[-1] = taus[0]
    elif kind == "cancel":  # B and -B cancel: the sum is rank 2 < c, the common block must not pad with junk
        low = torch.randn(9, 2, generator=gen, dtype=torch.float64) @ torch.randn(
            2, 7, generator=gen, dtype=torch.float64
        )
        taus = torch.stack([low, taus[0], -taus[0]])
    Q, R = _orthogonal(9, gen), _orthogonal(7, gen)
    for method, extra in ((iso_c, {}), (iso_cts, {"common_space_fraction": fraction})):
        assert_close(_call(method, Q @ taus @ R, **extra), Q @ _call(method, taus, **extra) @ R, rtol=1e-8, atol=1e-10)
