"""BlockPool: kept tensors are exact copies that share a few large blocks (see engine/pool.py for why)."""

import torch

from mergelab.ops.pool import BlockPool


def test_keep_copies_values_and_shape():
    pool = BlockPool(block_bytes=64)
    source = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    kept = pool.keep(source)
    source.zero_()  # the kept copy does not alias its source
    assert kept.shape == (2, 2)
    assert kept.tolist() == [[1.0, -2.0], [3.0, 4.0]]


def test_small_tensors_share_one_block_until_full():
    pool = BlockPool(block_bytes=16)  # 4 float32 per block
    a = pool.keep(torch.tensor([1.0, 2.0]))
    b = pool.keep(torch.tensor([3.0, 4.0]))
    c = pool.keep(torch.tensor([5.0]))  # block full: a new one
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert b.data_ptr() == a.data_ptr() + 2 * 4
    assert c.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
    assert (a.tolist(), b.tolist(), c.tolist()) == ([1.0, 2.0], [3.0, 4.0], [5.0])


def test_one_block_per_dtype_and_oversized_tensors():
    pool = BlockPool(block_bytes=16)
    ints = pool.keep(torch.tensor([7, 8], dtype=torch.int64))
    floats = pool.keep(torch.tensor([0.5]))
    big = pool.keep(torch.arange(10, dtype=torch.float32))  # larger than a block: a block of its own size
    assert ints.dtype == torch.int64 and ints.tolist() == [7, 8]
    assert floats.tolist() == [0.5]
    assert big.tolist() == list(range(10))
    assert pool.keep(torch.empty(0)).numel() == 0
