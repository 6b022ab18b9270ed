"""Per-tensor random generators: reproducible on CPU and GPU, independent of tensor order.

The seed of a tensor's generator is derived from ``(seed, crc32(name))`` -- never Python's salted
``hash()`` -- so a run draws the same numbers whatever the device, process or iteration order.
Draws happen on a CPU generator and are moved to the compute device afterwards.
"""

from __future__ import annotations

import zlib

import torch


def tensor_seed(seed: int, name: str) -> int:
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode("utf-8"))) % (2**63 - 1)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(tensor_seed(seed, name))
    return gen


def bernoulli_mask(shape: torch.Size | tuple[int, ...], keep: float, gen: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """Boolean mask with each entry True with probability ``keep``, drawn on CPU then moved."""
    return (torch.rand(shape, generator=gen, dtype=torch.float32) < keep).to(device)
