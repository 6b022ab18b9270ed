"""Small helpers of the continual merger's steps: content hashes of models and of the base, progress bars,
a context that does nothing."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from mergelab.io.tensor_source import TensorSource


class Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def progress_bar(show: bool, total: int, desc: str) -> Any:
    """A tqdm bar over bytes on stderr, as ``merge``'s; a no-op bar when not shown."""
    if not show:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


class _NullBar(Null):
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NullBar:  # type: ignore[override]
        return self


def hash_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def fingerprint(source: TensorSource) -> str:
    """Hash of the base's tensor names, shapes and dtypes (cheap; catches a swapped base)."""
    text = "|".join(f"{n}:{s.shape}:{s.dtype}" for n, s in sorted(source.specs.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def as_json(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True)
