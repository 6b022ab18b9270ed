"""Durable continual-merging state: generations of safetensors + a JSON manifest, swapped atomically.

Layout of a state folder::

    STATE/CURRENT             the name of the live generation (replaced atomically)
    STATE/gen-000003/         state tensors (safetensors, sharded above 5 GB) + manifest.json

A new generation is written completely (tensors, then manifest) before ``CURRENT`` is replaced by
``os.replace``; a process killed at any moment leaves ``CURRENT`` naming either the old or the new
complete generation, never a mix. Stale generations and temporary folders are removed on the next
successful commit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError
from mergelab.io.sources import SafetensorsSource, TensorSource, open_source

CURRENT = "CURRENT"
MANIFEST = "manifest.json"


def generation_name(step: int) -> str:
    return f"gen-{step:06d}"


def read_current(state_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The live generation folder and its manifest; raises MergelabError if there is none."""
    pointer = state_dir / CURRENT
    if not pointer.is_file():
        raise MergelabError("not a continual-merging state folder (no CURRENT file)", file=str(state_dir))
    generation = state_dir / pointer.read_text().strip()
    manifest_path = generation / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MergelabError(f"unreadable state manifest ({err})", file=str(manifest_path)) from None
    if not isinstance(manifest, dict) or "method" not in manifest:
        raise MergelabError("state manifest has no method", file=str(manifest_path))
    return generation, manifest


def open_state_tensors(generation: Path) -> TensorSource:
    source = open_source(generation)
    if not isinstance(source, SafetensorsSource):
        raise MergelabError("state tensors must be safetensors", file=str(generation))
    return source


def commit_generation(state_dir: Path, generation: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest into a complete generation folder, then point CURRENT at it."""
    _atomic_write(generation / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    _atomic_write(state_dir / CURRENT, generation.name + "\n")
    for stale in state_dir.iterdir():
        if stale.name not in (CURRENT, generation.name) and (stale.name.startswith("gen-") or ".mergelab-" in stale.name):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.mergelab-tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
