"""Append-only storage for the small tensors a method keeps while merging (e.g. TIES' pending
sign cancellations), in a few large blocks.

Why: each small tensor allocated during the merge pass lands at the top of the allocator's heap, and
a live allocation there pins every chunk temporary freed below it. A global-TIES merge of a 271 M
parameter model grew by ~1.1 GB over the merge pass this way (2.0-2.3 GB peak RSS, 0.9 GB without the
kept tensors; measured with ``benchmarks/bench_engine.py``'s default set). Blocks above glibc's mmap
threshold (32 MiB after :func:`mergelab.engine.runtime.tune_malloc`) are mapped outside the heap, and
untouched pages of a block cost no memory.
"""

from __future__ import annotations

import torch

BLOCK_BYTES = 64 << 20


class BlockPool:
    """``keep(t)`` returns a copy of ``t`` that lives in one of the pool's blocks (one block per dtype
    in use; a new one when it is full)."""

    def __init__(self, block_bytes: int = BLOCK_BYTES):
        self.block_bytes = block_bytes
        self._blocks: dict[torch.dtype, tuple[torch.Tensor, int]] = {}

    def keep(self, values: torch.Tensor) -> torch.Tensor:
        flat = values.detach().reshape(-1)
        n = flat.numel()
        block, used = self._blocks.get(flat.dtype, (None, 0))
        if block is None or used + n > block.numel():
            block, used = torch.empty(max(self.block_bytes // flat.element_size(), n), dtype=flat.dtype), 0
        kept = block[used : used + n]
        kept.copy_(flat)
        self._blocks[flat.dtype] = (block, used + n)
        return kept.view(values.shape)
