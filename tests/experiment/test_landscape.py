"""The loss-landscape planes: hand-checked PCA and three-point planes, the chunked Gram against a one-shot
reference, flatten/unflatten round trips, grid axes and the cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.experiment.landscape import (
    cross_entropy,
    flatten,
    float_names,
    grid_axes,
    in_plane_fraction,
    pca_plane,
    plane_through,
    point_on_plane,
    project,
    unflatten,
)


def test_pca_plane_of_two_orthogonal_offsets_is_their_span_with_hand_computed_shares() -> None:
    offsets = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    basis, explained = pca_plane(offsets)
    assert torch.allclose(basis.abs(), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), atol=1e-6)
    assert explained == pytest.approx([9 / 13, 4 / 13])
    origin = torch.tensor([1.0, 1.0, 1.0])
    coords = project(offsets + origin, origin, basis)
    assert torch.allclose(coords.abs(), torch.tensor([[3.0, 0.0], [0.0, 2.0]]), atol=1e-6)
    assert in_plane_fraction(offsets + origin, origin, basis) == pytest.approx([1.0, 1.0])


def test_a_point_off_the_plane_keeps_only_its_in_plane_part() -> None:
    basis, _ = pca_plane(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    point = torch.tensor([[0.0, 3.0, 4.0]])
    assert in_plane_fraction(point, torch.zeros(3), basis) == pytest.approx([3 / 5])


def test_points_on_one_line_have_no_plane() -> None:
    with pytest.raises(ValueError, match="less than two directions"):
        pca_plane(torch.tensor([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0]]))
    with pytest.raises(ValueError, match="collinear"):
        plane_through(torch.zeros(3), torch.tensor([1.0, 1.0, 0.0]), torch.tensor([2.0, 2.0, 0.0]))


@settings(max_examples=25, deadline=None)
@given(st.integers(3, 6), st.integers(5, 40), st.integers(1, 7), st.integers(0, 10_000))
def test_chunked_pca_equals_the_one_shot_svd(n: int, d: int, chunk: int, seed: int) -> None:
    offsets = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    basis, explained = pca_plane(offsets, chunk=chunk)
    _, s, vh = torch.linalg.svd(offsets.double(), full_matrices=False)  # reference: right singular vectors
    for k in range(2):  # same direction up to sign (distinct singular values with probability 1)
        assert abs(float(basis[k].double() @ vh[k])) == pytest.approx(1.0, abs=1e-4)
    assert explained == pytest.approx([float(s[0] ** 2 / (s**2).sum()), float(s[1] ** 2 / (s**2).sum())], rel=1e-6)
    assert torch.allclose(basis @ basis.T, torch.eye(2), atol=1e-5)


def test_the_plane_through_three_points_holds_all_three() -> None:
    gen = torch.Generator().manual_seed(0)
    origin, a, b = (torch.randn(10, generator=gen) for _ in range(3))
    basis = plane_through(origin, a, b)
    coords = project(torch.stack([origin, a, b]), origin, basis)
    assert float(coords[1, 1]) == pytest.approx(0.0, abs=1e-5)  # d1 points at the first point
    for k, point in enumerate([origin, a, b]):
        rebuilt = point_on_plane(origin, basis, float(coords[k, 0]), float(coords[k, 1]))
        assert torch.allclose(rebuilt, point, atol=1e-5)


def test_flatten_and_unflatten_round_trip_and_leave_integer_tensors_alone() -> None:
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "ids": torch.arange(4),
             "b": torch.tensor([7.0, 8.0], dtype=torch.float16)}
    names = float_names(state)
    assert names == ["w", "b"]
    vector = flatten(state, names)
    assert vector.tolist() == [0, 1, 2, 3, 4, 5, 7, 8]
    back = unflatten(vector * 2, state, names)
    assert back["w"].tolist() == [[0, 2, 4], [6, 8, 10]] and back["b"].dtype == torch.float16
    assert back["ids"] is state["ids"]
    with pytest.raises(ValueError, match="entries"):
        unflatten(torch.zeros(3), state, names)


def test_grid_axes_cover_the_points_with_a_margin() -> None:
    xs, ys = grid_axes(torch.tensor([[0.0, 1.0], [2.0, 1.0]]), 3, margin=0.5)
    assert xs == pytest.approx([-1.0, 1.0, 3.0])
    assert ys == pytest.approx([0.5, 1.0, 1.5])  # a zero span gets a unit span
    with pytest.raises(ValueError):
        grid_axes(torch.zeros(2, 2), 1)


def test_cross_entropy_by_hand() -> None:
    assert cross_entropy(torch.tensor([[0.0, 0.0]]), [0]) == pytest.approx(math.log(2))
    assert cross_entropy(torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]]), [0, 1]) == pytest.approx(
        (-math.log(3 / 4) - math.log(1 / 2)) / 2)
