"""Pretrained backbones, all from local folders (docs/data.md §1); transformers never reaches a hub.

Where a backbone name's folder is (:func:`backbone_folder`) is decided in :mod:`mergelab.io.names`, which
every model input goes through; this module adds what the zoo needs: ids, weight hashes, offline mode.
"""

from __future__ import annotations

import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path

from mergelab.errors import MergelabError
from mergelab.io.names import BACKBONES
from mergelab.io.names import DEFAULT as DEFAULT  # re-exported: the zoo's names for them
from mergelab.io.names import backbone_folder as backbone_folder

NAMES = BACKBONES  # every backbone name; the CLI and API accept them wherever a model path goes
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"


def offline() -> None:
    """No hub access from transformers, whatever the user's environment says."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def is_backbone_name(value: str) -> bool:
    """True for ``all-minilm-l6-v2`` and ``all-mpnet-base-v2``."""
    return value in NAMES


def backbone_id(backbone: str) -> str:
    """A short file-system-safe name for cache folders."""
    if backbone in NAMES:
        return backbone
    path = Path(backbone).resolve()
    return re.sub(r"[^A-Za-z0-9_.-]", "_", path.name) + "-" + hashlib.sha256(str(path).encode()).hexdigest()[:8]


@lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime: float) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(folder: Path) -> str:
    """sha256 of the folder's weight files (recorded with every expert built from it)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise MergelabError("no weights (*.safetensors or *.bin) in the model folder", file=str(folder))
    return files_sha256(files)


def files_sha256(files: list[Path]) -> str:
    """sha256 of one file, or of the files' sha256s joined (each cached by path, size and mtime)."""
    parts = [_file_sha256(str(f), f.stat().st_size, f.stat().st_mtime) for f in files]
    return parts[0] if len(parts) == 1 else hashlib.sha256("".join(parts).encode()).hexdigest()
