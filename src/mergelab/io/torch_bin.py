"""Torch checkpoints (``.bin``/``.pt``/``.pth``) loaded with ``weights_only=True`` and memory-mapped: a
pickle that needs code to load is refused, never run."""

from __future__ import annotations

import re
import weakref
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import MergelabError
from mergelab.io import sigbus
from mergelab.io.safetensors_header import TensorSpec
from mergelab.io.tensor_source import DictSource, TensorSource


class TorchSource(TensorSource):
    """``.bin``/``.pt``/``.pth`` files loaded with ``weights_only=True`` and memory-mapped."""

    def __init__(self, files: list[str], label: str, folder: Path | None = None):
        self.label = label
        self.folder = folder
        self.files = tuple(files)
        self._state: dict[str, torch.Tensor] = {}
        self._file: dict[str, str] = {}
        self._aliases: dict[str, str] = {}
        self._watched: list[weakref.finalize[Any, Any]] = []  # as SafetensorsSource's
        for path in files:
            state, mapped = _load_torch_file(path)
            part = DictSource(state, path)  # every value checked to be a tensor
            if mapped:
                self._watched.append(weakref.finalize(self, sigbus.unwatch, _watch_mapped(state, path)))
            self._aliases.update(part.aliases())
            for name in part.specs:
                if name in self._file:
                    raise MergelabError(f"tensor also stored in {self._file[name]}", file=path, tensor=name)
                self._state[name] = part.get(name)
                self._file[name] = path
        self.specs = {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in self._state.items()}

    def file_of(self, name: str) -> str:
        return self._file.get(name, self.label)

    def get(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        return self._state[name]

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def close(self) -> None:
        for unwatch in self._watched:
            unwatch()  # once only: the slot may be another map's later
        self._watched.clear()
        self._state.clear()


def _watch_mapped(state: dict[str, torch.Tensor], path: str) -> int | None:
    """Watch the memory map that ``torch.load(mmap=True)`` made of ``path``: the span of the tensors' storages."""
    storages = [t.untyped_storage() for t in state.values() if t.untyped_storage().nbytes()]
    if not storages:
        return None
    start = min(s.data_ptr() for s in storages)
    return sigbus.watch(start, max(s.data_ptr() + s.nbytes() for s in storages) - start, path)


def load_torch_file(path: str) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``, memory-mapped where the format allows; never runs code.

    A file whose pickle names a function or class to call is refused as needing code execution; one
    that is no zip archive nor a pickle torch can read (random bytes, text, an unknown opcode) is
    refused as not a valid torch checkpoint, whatever the unpickler tripped on.
    """
    return _load_torch_file(path)[0]


def _load_torch_file(path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """:func:`load_torch_file`, and whether the tensors are a memory map of the file (zip format)."""
    import pickle
    import zipfile

    def _load(mmap: bool) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        raise MergelabError(f"cannot read: {err.strerror}", file=path) from None
    if not magic:
        raise MergelabError("not a valid torch checkpoint (empty file)", file=path)
    # torch writes a zip archive, or (legacy) a pickle, of protocol 2 unless asked otherwise: one that
    # starts with neither and does not load is garbage (random bytes, text), not a damaged checkpoint
    garbage = not magic.startswith((b"PK\x03\x04", b"\x80"))
    garbage_error = MergelabError("not a valid torch checkpoint (neither a zip archive nor a protocol-2+ pickle)",
                                   file=path)
    mapped = True
    try:
        try:
            obj = _load(mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # legacy (non-zip) format cannot be memory-mapped
                raise
            mapped = False
            obj = _load(mmap=False)
    except pickle.UnpicklingError as err:
        reason = _unpickler_reason(str(err)) if "Weights only load failed" in str(err) else _first_line(err, "?")
        if _NEEDS_CODE.search(reason):
            raise MergelabError(f"refusing to unpickle: the file needs code execution ({reason})", file=path) from None
        if garbage:
            raise garbage_error from None
        raise MergelabError(f"corrupt torch checkpoint (unreadable pickle: {reason})", file=path) from None
    except OSError as err:
        raise MergelabError(f"cannot read: {err.strerror or _first_line(err, 'read error')}", file=path) from None
    except Exception as err:  # noqa: BLE001 (a damaged file makes torch's loader raise anything: KeyError, ...)
        if garbage:
            raise garbage_error from None
        detail = _first_line(err, type(err).__name__)
        if not isinstance(err, (RuntimeError, EOFError, zipfile.BadZipFile, ValueError)):
            detail = f"{type(err).__name__}: {detail}"
        raise MergelabError(f"corrupt or truncated torch checkpoint ({detail})", file=path) from None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):  # common wrappers of a state dict
            inner = obj.get(key)
            if isinstance(inner, dict) and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner, mapped
    if not isinstance(obj, dict):
        raise MergelabError(f"not a state dict but {type(obj).__name__}", file=path)
    return obj, mapped


# what the weights-only unpickler says when a pickle asks for a function or class (code), as opposed to
# bytes it cannot parse ("Unsupported operand 130")
_NEEDS_CODE = re.compile(r"GLOBAL|global|reduce|new object|build|class|instantiate", re.IGNORECASE)


def _first_line(err: BaseException, default: str) -> str:
    return (str(err).strip().splitlines() or [default])[0]


def _unpickler_reason(message: str) -> str:
    """The unpickler's own reason inside torch's "Weights only load failed" message."""
    for line in message.splitlines():
        line = line.strip()
        if line.startswith(("Unsupported", "Trying", "Can only", "String is too long", "Only persistent_load",
                            "persistent_load", "unsupported persistent")) or "GLOBAL" in line:
            return line.rstrip(".")
    return "unsupported content"
