"""Backbone names where a model path is accepted: ``all-minilm-l6-v2`` stands for its packaged folder.

A path that exists always wins over a name, so a folder called ``all-minilm-l6-v2`` in the working
directory is read as that folder. The zoo (transformers and friends) is imported only for a name.
"""

from __future__ import annotations

import os
from typing import Any

from mergelab.errors import MergelabError

BACKBONES = ("all-minilm-l6-v2", "all-mpnet-base-v2")  # the names mergelab.zoo.backbones knows


def resolve_model_name(model: Any) -> Any:
    """``model`` unchanged unless it is a string naming no existing path: then a backbone name becomes
    its folder, and anything else raises the usual "no such file or folder" (naming the backbones)."""
    if not isinstance(model, str) or os.path.exists(model):
        return model
    if model in BACKBONES:
        from mergelab.zoo.backbones import backbone_folder

        return str(backbone_folder(model))
    raise MergelabError(f"no such file or folder (or a backbone name: {', '.join(BACKBONES)})", file=model)
