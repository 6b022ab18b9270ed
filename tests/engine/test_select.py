"""Exact streaming selection equals torch.kthvalue on the concatenated stream."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.engine.select import StreamingKth


def select(chunks: list[torch.Tensor], ranks: list[list[int]]) -> list[list[float]]:
    kth = StreamingKth(chunks[0].shape[0])
    for chunk in chunks:
        kth.observe(chunk)
    kth.end_pass0(ranks)
    for chunk in chunks:
        kth.observe(chunk)
    return kth.values()


def test_special_values_and_several_ranks():
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, n, generator=gen) for n in (1, 7, 300)]
    chunks += [torch.zeros(2, 4), torch.full((2, 3), -0.0), torch.full((2, 2), float("inf")),
               torch.tensor([[-3e38, 1e-45], [1e-40, -1e-45]]), torch.full((2, 5), 0.5)]
    flat = torch.cat(chunks, dim=1)
    d = flat.shape[1]
    ranks = [[1, 2, d // 2, d - 1, d], [3, 100, d]]
    for row, (row_ranks, values) in enumerate(zip(ranks, select(chunks, ranks), strict=True)):
        for k, value in zip(row_ranks, values, strict=True):
            assert value == flat[row].kthvalue(k).values.item(), (row, k)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=40), min_size=1, max_size=4),
    st.data(),
)
def test_matches_kthvalue(chunk_values, data):
    chunks = [torch.tensor(values, dtype=torch.float32).reshape(1, -1) for values in chunk_values]
    flat = torch.cat(chunks, dim=1)[0]
    k = data.draw(st.integers(1, flat.numel()))
    assert select(chunks, [[k]])[0][0] == flat.kthvalue(k).values.item()
