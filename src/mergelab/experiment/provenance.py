"""What produced a result: versions, hardware, git commit (recorded with every run)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


def versions() -> dict[str, str | None]:
    """Versions of mergelab, Python and the libraries that change numbers (None when not installed)."""
    from mergelab.version import __version__

    out: dict[str, str | None] = {"mergelab": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "tokenizers", "safetensors"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def hardware(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def git_commit() -> str | None:
    """HEAD of the git checkout mergelab is imported from (``+dirty`` when tracked files changed), else None."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
