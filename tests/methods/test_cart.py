"""CART: hand-checked cases, an oracle port of the official code, presets, exclusion rules, properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergelab
from mergelab.errors import MergelabError
from mergelab.methods.cart import PRESETS, cart, kept_rank
from mergelab.methods.registry import TensorCtx
from mergelab.ops.spectral import OFFICIAL_EXCLUDE, is_matrix
from tests.helpers import assert_close, finetune_of, tiny_state


def official_cart(
    pretrained: dict[str, torch.Tensor],
    finetuned: list[dict[str, torch.Tensor]],
    initial_rank_ratio: float,
    prior: float,
    move_origin: bool = True,
) -> dict[str, torch.Tensor]:
    """Literal port of ``StaticMergeModule._merge_weights("CART")`` with ``_get_origin`` and the
    branch of ``_get_truncated_task_vectors`` it takes (no energy threshold, no discrete rank),
    https://github.com/JH-GEECS/CART/blob/964cfd7/src/merging.py; TaskVector sums written out as
    dict sums. ``move_origin=False``: the same function called without origins (the uncentred
    task vectors), the result added to the pretrained model."""
    task_vectors = [{k: ft[k] - pretrained[k] for k in pretrained} for ft in finetuned]
    avg_coeff = 1.0 / len(finetuned) if move_origin else 0.0
    _theta_avg = {k: pretrained[k] + avg_coeff * sum(tv[k] for tv in task_vectors) for k in pretrained}
    prev_origin, new_origin, rank_ratio = pretrained, _theta_avg, initial_rank_ratio
    decomposed = []
    for task_vector in task_vectors:
        svd_vector = {}
        for key, value in task_vector.items():
            if ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key):
                _val = value + prev_origin[key] - new_origin[key]
                U, s, V_T = torch.linalg.svd(_val, full_matrices=False)
                dim = s.shape[0]
                if rank_ratio == 0.0:
                    U, s, V_T = torch.zeros_like(U), torch.zeros_like(s), torch.zeros_like(V_T)
                    parsed_dim = 1
                elif rank_ratio == 1.0:
                    parsed_dim = dim
                else:
                    parsed_dim = max(1, int(rank_ratio * dim))
                svd_vector[key] = (U[:, :parsed_dim] * s[:parsed_dim]) @ V_T[:parsed_dim, :]
            else:
                svd_vector[key] = value + prev_origin[key] - new_origin[key]
                if rank_ratio == 0.0:
                    svd_vector[key] = torch.zeros_like(svd_vector[key])
        decomposed.append(svd_vector)
    lowrank = {k: sum(d[k] for d in decomposed) for k in pretrained}
    return {k: _theta_avg[k] + prior * lowrank[k] for k in pretrained}


def _cart(taus, name="w", rank_ratio=0.08, scaling=1.0, preset="paper", exclude=None, svd_dtype="float64", center=True,
          keep="top", route=None):
    return cart(
        taus,
        torch.zeros(taus.shape[1:], dtype=taus.dtype),
        TensorCtx(name),
        rank_ratio=rank_ratio,
        scaling=scaling,
        preset=preset,
        exclude=exclude or [],
        svd_dtype=svd_dtype,
        center=center,
        keep=keep,
        route=route,
    )


def test_hand_checked_three_tasks():
    # taus = 3 e1e1^T, 3 e2e2^T, 3 e3e3^T: mean = I; centred: diag(2,-1,-1), diag(-1,2,-1), diag(-1,-1,2);
    # k = max(1, int(0.08 * 3)) = 1 keeps the (unique) top triplet of each: 2 e_t e_t^T; their sum is 2 I.
    # delta = I + scaling * 2 I: with scaling 1 every task is restored in full (3 I).
    taus = torch.stack([3 * torch.diag(torch.eye(3)[t]) for t in range(3)])
    assert_close(_cart(taus), 3 * torch.eye(3))
    assert_close(_cart(taus, scaling=0.5), 2 * torch.eye(3))


@pytest.mark.parametrize("rank_ratio", [0.0, 1.0])
def test_rank_ratio_zero_or_one_gives_weight_average(rank_ratio):
    # 1: theta_avg + scaling * sum_t (tau_t - mean) = theta_avg, centred vectors sum to zero; 0: nothing kept
    taus = torch.randn(4, 6, 5, dtype=torch.float64)
    centred_sum = (taus - taus.mean(dim=0)).sum(dim=0)
    expected = taus.mean(dim=0) + 2.0 * centred_sum  # task arithmetic around the average, literally
    assert_close(_cart(taus, rank_ratio=rank_ratio, scaling=2.0), expected, rtol=1e-10, atol=1e-12)
    assert_close(expected, taus.mean(dim=0), rtol=1e-10, atol=1e-12)


def test_non_matrices_are_weight_average_whatever_the_scaling():
    taus = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
    assert_close(_cart(taus, scaling=5.0), torch.tensor([2.0, 0.0]))
    mats = torch.randn(3, 4, 4)
    assert_close(_cart(mats, name="visual.proj", exclude=OFFICIAL_EXCLUDE["cart"], scaling=3.0), mats.mean(dim=0))


def test_kept_rank_follows_official_rounding():
    assert [kept_rank(768, r) for r in (0.0, 0.08, 0.12, 0.16, 0.32, 1.0)] == [0, 61, 92, 122, 245, 768]
    assert kept_rank(6, 0.08) == 1  # max(1, int(0.48))
    assert kept_rank(100, 0.29) == 28  # int(28.999999999999996), as the official int(rank_ratio * dim)


def test_presets_and_explicit_override():
    taus = torch.randn(5, 20, 12, dtype=torch.float64)
    for preset, values in PRESETS.items():
        from_preset = _cart(taus, preset=preset, rank_ratio=None, scaling=None)
        assert_close(from_preset, _cart(taus, rank_ratio=values["rank_ratio"], scaling=values["scaling"]))
    mixed = _cart(taus, preset="official_8", rank_ratio=None, scaling=0.5)  # rank 0.12 from the preset
    assert_close(mixed, _cart(taus, rank_ratio=0.12, scaling=0.5))
    base = {"w": torch.zeros(4, 4)}
    with pytest.raises(MergelabError, match="preset"):
        mergelab.merge("cart", base, [base], preset="official_9")
    with pytest.raises(MergelabError, match="rank_ratio"):
        mergelab.merge("cart", base, [base], rank_ratio=1.5)


def test_official_exclusion_rule():
    names = {  # open_clip (official checkpoints) and HF CLIP names; True = decomposed by the official code
        "model.visual.transformer.resblocks.0.attn.in_proj_weight": True,
        "model.visual.transformer.resblocks.0.mlp.c_fc.weight": True,
        "model.visual.positional_embedding": False,
        "model.visual.proj": False,
        "model.text_projection": False,
        "model.token_embedding.weight": False,
        "vision_model.encoder.layers.0.self_attn.q_proj.weight": True,
        "vision_model.encoder.layers.0.mlp.fc1.weight": True,
        "vision_model.embeddings.position_embedding.weight": False,
        "visual_projection.weight": False,
    }
    for name, decomposed in names.items():
        official = ("attn" in name or "mlp" in name) and not ("ln" in name or "bias" in name)
        assert official == decomposed
        assert is_matrix(name, (4, 4), OFFICIAL_EXCLUDE["cart"]) == decomposed, name
    assert not is_matrix("model.visual.transformer.resblocks.0.attn.in_proj_weight", (4,), [])


@pytest.mark.parametrize("rank_ratio,prior", [(0.08, 1.0), (0.12, 2.0), (0.32, 1.9), (0.0, 1.0), (1.0, 1.5)])
def test_matches_official_port(rank_ratio, prior):
    gen = torch.Generator().manual_seed(int(rank_ratio * 100))
    shapes = {
        "blocks.0.attn.in_proj_weight": (24, 8),
        "blocks.0.attn.in_proj_bias": (24,),
        "blocks.0.mlp.c_proj.weight": (8, 30),
        "blocks.0.ln_1.weight": (8,),
        "visual.proj": (8, 6),
        "positional_embedding": (5, 8),
        "logit_scale": (),
    }
    pre = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    fts = [
        {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in pre.items()}
        for _ in range(4)
    ]
    expected = official_cart(pre, fts, rank_ratio, prior)
    merged = mergelab.merge(
        "cart", pre, fts, dtype="float64", rank_ratio=rank_ratio, scaling=prior, exclude=OFFICIAL_EXCLUDE["cart"]
    )
    for name in pre:
        assert_close(merged[name], expected[name], rtol=1e-9, atol=1e-10)


def test_public_api_keeps_keys_and_dtypes():
    base = tiny_state(5, dtype=torch.float16)
    merged = mergelab.merge("cart", base=base, models=[finetune_of(base, i) for i in range(3)], preset="official_14")
    assert list(merged) == list(base)
    assert all(merged[n].dtype == base[n].dtype and merged[n].shape == base[n].shape for n in base)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5), st.integers(0, 10_000), st.floats(0.0, 1.0), st.floats(-2.0, 2.0))
def test_copies_of_base_give_base(n_models, seed, rank_ratio, scaling):
    base = tiny_state(seed)
    merged = mergelab.merge("cart", base, [base] * n_models, rank_ratio=rank_ratio, scaling=scaling)
    for name in base:
        assert torch.equal(merged[name], base[name])


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 1.0), st.floats(-2.0, 2.0))
def test_two_tasks_give_weight_average(seed, rank_ratio, scaling):
    # centred vectors are c and -c, and SVD_k(-c) = -SVD_k(c): they cancel for any k
    base = tiny_state(seed)
    models = [finetune_of(base, seed), finetune_of(base, seed + 1)]
    merged = mergelab.merge("cart", base, models, rank_ratio=rank_ratio, scaling=scaling, dtype="float64")
    for name, tensor in base.items():
        if tensor.is_floating_point():
            assert_close(merged[name], (models[0][name] + models[1][name]) / 2, rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 5), st.integers(0, 10_000), st.sampled_from(list(PRESETS)), st.randoms(use_true_random=False))
def test_task_order_does_not_matter(n_models, seed, preset, rnd):
    base = tiny_state(seed)
    models = [finetune_of(base, seed + i) for i in range(n_models)]
    shuffled = models[:]
    rnd.shuffle(shuffled)
    one = mergelab.merge("cart", base, models, preset=preset, dtype="float64")
    two = mergelab.merge("cart", base, shuffled, preset=preset, dtype="float64")
    for name in base:
        assert_close(one[name], two[name], rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_rotation_equivariance(n_tasks, seed, rank_ratio):
    gen = torch.Generator().manual_seed(seed)
    taus = torch.randn(n_tasks, 9, 7, generator=gen, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(9, 9, generator=gen, dtype=torch.float64))[0]
    R = torch.linalg.qr(torch.randn(7, 7, generator=gen, dtype=torch.float64))[0]
    assert_close(
        _cart(Q @ taus @ R, rank_ratio=rank_ratio, scaling=1.3),
        Q @ _cart(taus, rank_ratio=rank_ratio, scaling=1.3) @ R,
        rtol=1e-8,
        atol=1e-10,
    )


@pytest.mark.parametrize("rank_ratio", [0.0, 0.08, 0.5, 1.0])
def test_uncentred_matches_official_port(rank_ratio):
    # center=False: the official truncation without an origin move, added to the pretrained model
    gen = torch.Generator().manual_seed(7)
    shapes = {"blocks.0.attn.w": (12, 10), "blocks.0.mlp.bias": (10,), "head.w": (6, 10)}
    pre = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in pre.items()}]
    fts += [{k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in pre.items()}]
    expected = official_cart(pre, fts, rank_ratio, 0.3, move_origin=False)
    merged = mergelab.merge(
        "cart",
        pre,
        fts,
        dtype="float64",
        rank_ratio=rank_ratio,
        scaling=0.3,
        center=False,
        exclude=OFFICIAL_EXCLUDE["cart"],
    )
    for name in pre:
        assert_close(merged[name], expected[name], rtol=1e-9, atol=1e-10)


def test_uncentred_hand_checked():
    # rank-1 task matrices are kept whole at k = 1; rank 1 of diag(3, 1) keeps 3 e1e1^T
    taus = torch.stack([torch.diag(torch.tensor([3.0, 1.0])), torch.diag(torch.tensor([0.0, 2.0]))])
    delta = cart(
        taus,
        torch.zeros(2, 2),
        TensorCtx("w"),
        rank_ratio=0.5,
        scaling=0.5,
        preset="paper",
        exclude=[],
        svd_dtype="float64",
        center=False,
        keep="top",
        route=None,
    )
    assert_close(delta, 0.5 * torch.diag(torch.tensor([3.0, 2.0])))
    bias = cart(
        torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        torch.zeros(2),
        TensorCtx("b"),
        rank_ratio=0.5,
        scaling=0.5,
        preset="paper",
        exclude=[],
        svd_dtype="float64",
        center=False,
        keep="top",
        route=None,
    )
    assert_close(bias, torch.tensor([2.0, 3.0]))  # task arithmetic: 0.5 * (4, 6)


def test_reverse_order_keeps_the_smallest_singular_triplets():
    # centred vectors diag(2,-1,-1), diag(-1,2,-1), diag(-1,-1,2) (see the hand-checked case above): singular
    # values (2, 1, 1); the smallest one of each is a -1 direction of a multiplicity-2 value, so check the sum
    # over tasks through a case with distinct values instead: taus whose centred vectors are diag(3, 1, 0.5) and
    # its negative (two tasks), bottom-1 keeps diag(0, 0, 0.5) and diag(0, 0, -0.5): the weight average again.
    c = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
    taus = torch.stack([c, -c]) + 1.0
    assert_close(_cart(taus, rank_ratio=0.34, keep="bottom"), torch.ones(3, 3, dtype=torch.float64))
    # three tasks, distinct singular values: bottom-k is the SVD minus its top part
    gen = torch.Generator().manual_seed(0)
    taus = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    centred = taus - taus.mean(dim=0)
    expected = taus.mean(dim=0).clone()
    for x in centred:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        expected += 2.0 * (u[:, 3:] * s[3:]) @ vh[3:]  # k = int(0.25 * 4) = 1: the last triplet
    assert_close(_cart(taus, rank_ratio=0.25, scaling=2.0, keep="bottom"), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("center", [True, False])
def test_reverse_order_at_full_rank_equals_the_proper_order(center):
    taus = torch.randn(4, 5, 7, dtype=torch.float64)
    for ratio in (0.0, 1.0):
        assert_close(_cart(taus, rank_ratio=ratio, keep="bottom", center=center),
                     _cart(taus, rank_ratio=ratio, center=center), rtol=1e-10, atol=1e-12)


def test_direct_routing_is_the_anchor_plus_the_tasks_own_rank_k_part():
    # Eq. (5): R_k(t) = anchor + SVD_k(theta_t - anchor), no scaling; non-matrices are task t's own
    c = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
    taus = torch.stack([c, -c]) + 1.0  # mean 1; centred task vectors c and -c
    top = torch.diag(torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64))
    assert_close(_cart(taus, rank_ratio=0.34, scaling=5.0, route=0), 1.0 + top)  # k = 1
    assert_close(_cart(taus, rank_ratio=0.34, route=1), 1.0 - top)
    bottom = torch.diag(torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64))
    assert_close(_cart(taus, rank_ratio=0.34, route=0, keep="bottom"), 1.0 + bottom)
    # uncentred: the anchor is the base (zero task vector)
    u, s, vh = torch.linalg.svd(taus[0])
    assert_close(_cart(taus, rank_ratio=0.34, route=0, center=False), s[0] * torch.outer(u[:, 0], vh[0]))
    assert_close(_cart(taus, rank_ratio=1.0, route=1), taus[1])  # full rank: the expert itself
    bias = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert_close(_cart(bias, name="b", route=1), bias[1])


def test_route_must_name_one_of_the_models(tmp_path):
    base = tiny_state(0)
    models = [finetune_of(base, i) for i in range(3)]
    with pytest.raises(MergelabError, match="route must be the index of one of the 3 models"):
        mergelab.merge("cart", base, models, route=3)
    routed = mergelab.merge("cart", base, models, route=2, rank_ratio=1.0)
    for name, tensor in models[2].items():
        if tensor.is_floating_point():
            assert_close(routed[name], tensor, rtol=1e-5, atol=1e-6)
