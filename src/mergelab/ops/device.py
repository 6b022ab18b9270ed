"""The compute device a merge asks for, checked."""

from __future__ import annotations

import torch

from mergelab.errors import MergelabError


def resolve_device(device: str | torch.device, require: bool) -> torch.device:
    """``cpu`` or ``cuda[:n]``; with ``require``, CUDA must be available. Raises MergelabError."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise MergelabError(f"unknown device {device!r} (use 'cpu' or 'cuda')") from None
    if target.type not in ("cpu", "cuda"):
        raise MergelabError(f"unsupported device {device!r} (use 'cpu' or 'cuda')")
    if target.type == "cuda" and require:
        if not torch.cuda.is_available():
            raise MergelabError(f"device {str(target)!r} requested but no CUDA GPU is available")
        count = torch.cuda.device_count()
        if target.index is not None and target.index >= count:
            raise MergelabError(f"device {str(target)!r} requested but this machine has {count} CUDA GPU(s) "
                                f"(cuda:0 to cuda:{count - 1})")
    return target
