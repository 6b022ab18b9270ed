"""Exact streaming selection (``StreamingKth``) equals ``torch.kthvalue`` on the concatenated stream."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.engine.chunks import run_chunks
from mergelab.ops import select
from mergelab.ops.select import StreamingKth

TINY = 1.4e-45  # the smallest positive float32 denormal


def streamed(chunks: list[torch.Tensor], ranks: list[list[int]], nonnegative: bool = False,
             dtype: torch.dtype | None = torch.float32, threads: int = 1) -> list[list[float]]:
    """Every pass over the same chunks, as the engine runs them (on ``threads`` threads, in any order)."""
    kth = StreamingKth(chunks[0].shape[0], nonnegative=nonnegative, dtype=dtype)

    def each_chunk() -> None:
        run_chunks(lambda i: kth.observe(chunks[i]), range(len(chunks)), threads)

    each_chunk()
    kth.end_pass0(ranks)
    for index in range(1, kth.n_passes):
        if index > 1:
            kth.end_pass()
        each_chunk()
    return kth.values()


def check(chunks: list[torch.Tensor], ranks: list[list[int]], nonnegative: bool = False,
          dtype: torch.dtype | None = torch.float32, threads: int = 1) -> None:
    flat = torch.cat([c.reshape(c.shape[0], -1) for c in chunks], dim=1)
    results = streamed(chunks, ranks, nonnegative, dtype, threads)
    for row, (row_ranks, values) in enumerate(zip(ranks, results, strict=True)):
        for k, value in zip(row_ranks, values, strict=True):
            assert value == flat[row].kthvalue(k).values.item(), (row, k)  # -0.0 == 0.0, inf == inf


def special_chunks() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    one = torch.tensor(1.0)
    near_one = [torch.nextafter(one, torch.tensor(2.0)).item(), torch.nextafter(one, torch.tensor(0.0)).item()]
    return [
        torch.randn(3, 1, generator=gen),
        torch.randn(3, 2, 4, generator=gen),  # chunks may have any trailing shape
        torch.tensor([[0.0, -0.0, 0.0], [-0.0, -0.0, 0.0], [0.0, 0.0, 0.0]]),
        torch.tensor([[float("inf"), -float("inf"), 3e38]] * 3),
        torch.tensor([[TINY, -TINY, 1e-40], [1e-39, -1e-42, TINY], [1e-45, 2e-45, -3e-45]]),  # denormals
        torch.tensor([[1.0, *near_one]] * 3),  # same high bits, different low bits
        torch.full((3, 6), 0.5),  # ties
        torch.randn(3, 50, generator=gen) * 1e-3,
    ]


def test_special_values_several_ranks_per_row():
    chunks = special_chunks()
    d = sum(c[0].numel() for c in chunks)
    ranks = [[1, 2, d // 2, d - 1, d], [d, 1, 7, 7], list(range(1, d + 1))]  # every rank of the last row
    check(chunks, ranks)


def test_magnitudes_fast_path_special_values():
    chunks = [c.abs() for c in special_chunks()]  # abs(-0.0) is +0.0
    d = sum(c[0].numel() for c in chunks)
    check(chunks, [[1, 2, d // 2, d - 1, d], [d, 1, 7, 7], list(range(1, d + 1))], nonnegative=True)


def float64_chunks() -> list[torch.Tensor]:
    """Float64 specials, and neighbours that only the low 32 bits of a float64 key tell apart."""
    one = torch.tensor(1.0, dtype=torch.float64)
    up, down = torch.nextafter(one, one + 1).item(), torch.nextafter(one, one - 1).item()
    tiny = 5e-324  # the smallest positive float64 denormal
    gen = torch.Generator().manual_seed(1)
    return [
        torch.tensor([[1.0, up, down, -up], [tiny, -tiny, 0.0, -0.0], [1e300, -1e-300, float("inf"), 1.0 + 2**-40]],
                     dtype=torch.float64),
        torch.randn(3, 2, 5, generator=gen, dtype=torch.float64) * 1e-3,
        torch.full((3, 4), 0.1, dtype=torch.float64),
    ]


@pytest.mark.parametrize("dtype", [torch.float64, None])  # None: the width follows the first chunk
def test_float64_keys_are_exact(dtype):
    chunks = float64_chunks()
    d = sum(c[0].numel() for c in chunks)
    ranks = [list(range(1, d + 1))] * 3  # every rank of every row
    check(chunks, ranks, dtype=dtype)
    check([c.abs() for c in chunks], ranks, nonnegative=True, dtype=dtype)
    assert StreamingKth(1, dtype=torch.float64).n_passes == 4 and StreamingKth(1).n_passes == 2


def test_float32_keys_round_float64_values():
    """The default keys are float32: float64 neighbours of 1.0 are selected as 1.0 (PCB's documented choice)."""
    chunk = float64_chunks()[0][:1]  # 1.0, 1.0 + ulp, 1.0 - ulp, -(1.0 + ulp)
    assert streamed([chunk], [[2, 3, 4]]) == [[1.0, 1.0, 1.0]]
    assert streamed([chunk], [[2, 3, 4]], dtype=None)[0] == sorted(chunk[0].tolist())[1:]


def test_values_before_the_last_pass_is_refused():
    kth = StreamingKth(1, dtype=torch.float64)
    kth.observe(torch.zeros(1, 4, dtype=torch.float64))
    kth.end_pass0([[2]])
    kth.observe(torch.zeros(1, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="before the last of 4 passes"):
        kth.values()


def test_magnitudes_fast_path_refuses_negative_values():
    kth = StreamingKth(1, nonnegative=True)
    for value in (-1.0, -0.0):  # -0.0 would sort below +0.0 by its bits
        with pytest.raises(ValueError, match="negative"):
            kth.observe(torch.tensor([[1.0, value]]))


def test_rank_1_and_d_on_constant_and_single_element_rows():
    check([torch.full((2, 5), -2.5)], [[1, 5], [3]])
    check([torch.tensor([[7.0]])], [[1]])


def test_inner_chunking(monkeypatch):
    monkeypatch.setattr(select, "_CHUNK", 3)  # rows are split again inside observe()
    check(special_chunks(), [[1, 10, 40], [20], [77]])


def test_rank_out_of_range():
    kth = StreamingKth(1)
    kth.observe(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="outside"):
        kth.end_pass0([[5]])


finite_or_inf = st.floats(width=32, allow_nan=False)
special = st.sampled_from([0.0, -0.0, TINY, -TINY, 1.0, -1.0, float("inf"), -float("inf")])


@settings(max_examples=50, deadline=None, database=None)  # no .hypothesis/ folder in the repo
@given(
    n_rows=st.integers(1, 3),
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    data=st.data(),
)
def test_matches_kthvalue(n_rows, lengths, data):
    chunks = [
        torch.tensor(data.draw(st.lists(finite_or_inf | special, min_size=n * n_rows, max_size=n * n_rows)),
                     dtype=torch.float32).reshape(n_rows, n)
        for n in lengths
    ]
    d = sum(lengths)
    ranks = [data.draw(st.lists(st.integers(1, d), min_size=1, max_size=4)) for _ in range(n_rows)]
    check(chunks, ranks)


@settings(max_examples=50, deadline=None, database=None)
@given(
    n_rows=st.integers(1, 3),
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    data=st.data(),
)
def test_magnitudes_fast_path_matches_kthvalue(n_rows, lengths, data):
    chunks = [
        torch.tensor(data.draw(st.lists(finite_or_inf | special, min_size=n * n_rows, max_size=n * n_rows)),
                     dtype=torch.float32).reshape(n_rows, n).abs()
        for n in lengths
    ]
    d = sum(lengths)
    ranks = [data.draw(st.lists(st.integers(1, d), min_size=1, max_size=4)) for _ in range(n_rows)]
    check(chunks, ranks, nonnegative=True)


@settings(max_examples=40, deadline=None, database=None)
@given(
    n_rows=st.integers(1, 3),
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=3),
    nonnegative=st.booleans(),
    data=st.data(),
)
def test_float64_keys_match_kthvalue(n_rows, lengths, nonnegative, data):
    values = st.floats(allow_nan=False) | st.sampled_from([0.0, -0.0, 5e-324, 1.0, 1.0 + 2**-52, float("inf")])
    chunks = [
        torch.tensor(data.draw(st.lists(values, min_size=n * n_rows, max_size=n * n_rows)),
                     dtype=torch.float64).reshape(n_rows, n)
        for n in lengths
    ]
    chunks = [c.abs() for c in chunks] if nonnegative else chunks
    d = sum(lengths)
    ranks = [data.draw(st.lists(st.integers(1, d), min_size=1, max_size=4)) for _ in range(n_rows)]
    check(chunks, ranks, nonnegative, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nonnegative", [False, True])
def test_chunks_observed_from_several_threads(dtype, nonnegative):
    gen = torch.Generator().manual_seed(3)
    chunks = [torch.randn(2, 5000, generator=gen, dtype=dtype) for _ in range(40)]
    if nonnegative:
        chunks = [c.abs() for c in chunks]
    check(chunks, [[1, 777, 200_000], [100_000]], nonnegative, dtype, threads=4)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.lists(st.integers(1, 300), min_size=1, max_size=4), st.integers(-2, 2),
       st.integers(1, 3), st.data())
def test_window_count_gives_kthvalue_or_none(n_rows, lengths, shift, width, data):
    """``WindowCount`` is exact when the k-th key's high bits are in the window, and says None otherwise."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    chunks = [torch.randn(n_rows, n, generator=gen).abs() for n in lengths]
    whole = torch.cat(chunks, dim=1)
    rank = data.draw(st.integers(1, whole.shape[1]))
    expected = whole.kthvalue(rank, dim=1).values
    bins = [int(v.view(torch.int32)) >> 16 for v in expected]
    lows = [max(b + shift, 0) for b in bins]
    window = select.WindowCount(lows, width)
    for chunk in chunks:
        window.observe(chunk)
    for value, want, b, low in zip(window.values(rank), expected.tolist(), bins, lows, strict=True):
        assert value == (want if 0 <= b - low < width else None)
