"""The one lazy interface every model input is read through (:class:`TensorSource`: name -> tensor, read
one at a time), and its in-memory form (:class:`DictSource`: a state dict or a module's)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import MergelabError
from mergelab.io.safetensors_header import DTYPE_NAMES, TensorSpec

SAMPLE_BLOCKS, SAMPLE_BYTES = 32, 4096  # what fingerprint() reads of each file


class TensorSource:
    """A checkpoint read lazily: ``specs`` come from headers, ``get`` reads one tensor's data."""

    label: str  # how errors and provenance name this input
    folder: Path | None = None  # the model folder, for config/tokenizer files
    specs: dict[str, TensorSpec]
    warnings: tuple[str, ...] = ()  # what opening it found worth a word (shown in the plan, logged)
    files: tuple[str, ...] = ()  # the files read, if any

    def fingerprint(self) -> bytes | None:
        """A digest of the files' sizes and of bytes sampled across them (``SAMPLE_BLOCKS`` blocks of
        ``SAMPLE_BYTES`` each, evenly spaced, first and last included): equal for the same content,
        and for different content of the same layout only where no sampled block differs. None for
        an input not read from files."""
        if not self.files:
            return None
        digest = hashlib.sha256()
        for path in self.files:
            try:
                with open(path, "rb") as handle:
                    size = os.fstat(handle.fileno()).st_size
                    digest.update(size.to_bytes(8, "little"))
                    last = max(0, size - SAMPLE_BYTES)
                    for k in range(SAMPLE_BLOCKS):
                        digest.update(os.pread(handle.fileno(), SAMPLE_BYTES, last * k // (SAMPLE_BLOCKS - 1)))
            except OSError:
                return None
        return digest.digest()

    def file_of(self, name: str) -> str:
        return self.label

    def get(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name``. ``into`` (uint8, at least the tensor's bytes) may be used as the
        read buffer, in which case the result is a view of it: readers that copy file data reuse
        the caller's buffer instead of faulting in fresh memory for every tensor."""
        raise NotImplementedError

    def copies(self, name: str) -> bool:
        """Whether :meth:`get` copies the data of ``name`` into memory (and so can use ``into``)."""
        return False

    def release(self, name: str) -> None:
        """A hint that the data of ``name`` read by :meth:`get` is no longer needed (the tensors
        returned must not be used after it)."""

    def aliases(self) -> dict[str, str]:
        """``{name: canonical}`` for tensors that share storage with an earlier one (tied weights)."""
        return {}

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs.values())

    def close(self) -> None:
        pass


class DictSource(TensorSource):
    def __init__(self, state: Mapping[str, Any], label: str, folder: Path | None = None):
        self.label = label
        self.folder = folder
        self._state: dict[str, torch.Tensor] = {}
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise MergelabError(f"not a tensor but {type(value).__name__}", file=label, tensor=str(name))
            if value.dtype not in DTYPE_NAMES:
                raise MergelabError(f"unsupported dtype {value.dtype}", file=label, tensor=str(name))
            self._state[str(name)] = value
        self.specs = {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in self._state.items()}

    def get(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        return self._state[name].detach()

    def aliases(self) -> dict[str, str]:
        seen: dict[tuple[Any, ...], str] = {}
        out = {}
        for name, tensor in self._state.items():
            if tensor.numel() == 0:
                continue
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
            if key in seen:
                out[name] = seen[key]
            else:
                seen[key] = name
        return out
