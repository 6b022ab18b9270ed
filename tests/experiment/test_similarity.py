"""Task-vector cosine similarity, streamed tensor by tensor: hand-checked values, equal to the flattened
formula, symmetric with a unit diagonal, invariant to the shard layout of the inputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mergelab.experiment.similarity import cosine_from_gram, cosine_matrix


def close(actual: list[list[float]], expected: list[list[float]]) -> None:
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64))


def test_hand_made_task_vectors_split_over_two_tensors() -> None:
    base = {"a": torch.zeros(2), "b": torch.ones(1), "ids": torch.arange(3)}
    # task vectors (a0, a1, b0): t1 = (1, 0, 0), t2 = (0, 1, 0), t3 = (1, 1, 0), t4 = (0, 0, -2)
    models = [{"a": torch.tensor([1.0, 0.0]), "b": torch.ones(1), "ids": torch.arange(3)},
              {"a": torch.tensor([0.0, 1.0]), "b": torch.ones(1), "ids": torch.arange(3)},
              {"a": torch.tensor([1.0, 1.0]), "b": torch.ones(1), "ids": torch.arange(3)},
              {"a": torch.zeros(2), "b": -torch.ones(1), "ids": torch.arange(3)}]
    cos = cosine_matrix(base, models)
    r = 1 / math.sqrt(2)
    close(cos, [[1, 0, r, 0], [0, 1, r, 0], [r, r, 1, 0], [0, 0, 0, 1]])


def test_opposite_and_zero_task_vectors() -> None:
    base = {"w": torch.zeros(3)}
    cos = cosine_matrix(base, [{"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.tensor([-2.0, -4.0, -6.0])},
                               {"w": torch.zeros(3)}])
    close(cos, [[1, -1, 0], [-1, 1, 0], [0, 0, 1]])


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 4), st.integers(0, 10_000))
def test_equals_flattened_cosine_symmetric_unit_diagonal(n_models: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    base = {"m": torch.randn(3, 4, generator=gen), "v": torch.randn(5, generator=gen)}
    models = [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(n_models)]
    cos = cosine_matrix(base, models)
    flat = [torch.cat([(m[k].double() - base[k].double()).flatten() for k in base]) for m in models]
    for i in range(n_models):
        assert cos[i][i] == 1.0
        for j in range(n_models):
            assert cos[i][j] == cos[j][i]
            assert cos[i][j] == pytest.approx(float(torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0)),
                                              abs=1e-9)


def test_files_read_lazily_give_the_same_matrix(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    base = {"m": torch.randn(4, 4, generator=gen), "v": torch.randn(4, generator=gen)}
    models = [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i, m in enumerate(models):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(m, str(paths[-1]))
    close(cosine_matrix(tmp_path / "base.safetensors", paths), cosine_matrix(base, models))


def test_gram_to_cosine() -> None:
    gram = torch.tensor([[4.0, 2.0], [2.0, 9.0]], dtype=torch.float64)  # |t1| = 2, |t2| = 3, <t1, t2> = 2
    close(cosine_from_gram(gram), [[1.0, 1 / 3], [1 / 3, 1.0]])
