"""Safetensors files read lazily: headers validated up front, each tensor mapped (or read) on demand and
its pages released once merged."""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mergelab.errors import MergelabError
from mergelab.io import sigbus
from mergelab.io.safetensors_header import read_header
from mergelab.io.tensor_source import TensorSource


class SafetensorsSource(TensorSource):
    """One or more safetensors files; ``files`` maps each tensor name to its shard.

    Tensors are views of a private (copy-on-write) memory map of their file: the data is read
    where it lies in the page cache, with no copy into a buffer first (a copy costs as much
    memory bandwidth as the merge's own read of the data, and a fresh buffer a page fault per
    4 KB). ``get`` asks the kernel to read the tensor's pages ahead (``MADV_WILLNEED``: the engine
    calls it a tensor ahead in its reader thread, so a file not yet in the page cache is read
    from disk while the previous tensor is merged; pre-faulting them with ``MADV_POPULATE_READ``
    measured slower than faulting them in where they are used), and :meth:`release` drops them
    from this process once the tensor is done, so the resident memory holds only the tensors in
    use. Writes into a view never reach the file. A tensor whose offset is not a multiple of its
    element size (possible in hand-made files) is read with a positioned read instead, into
    ``into`` if given. Each map is watched by :mod:`mergelab.io.sigbus`: a file truncated by another
    process while it is read ends the process with a one-line error (exit 2), not a bus error.
    """

    def __init__(self, files: list[str], label: str, folder: Path | None = None):
        self.label = label
        self.folder = folder
        self.files = tuple(files)
        self.specs = {}
        self._file: dict[str, str] = {}
        self._offset: dict[str, int] = {}
        for path in files:
            header = read_header(path)
            for name, spec in header.specs.items():
                if name in self._file:
                    raise MergelabError(f"tensor also stored in {self._file[name]}", file=path, tensor=name)
                self.specs[name] = spec
                self._file[name] = path
                self._offset[name] = header.offsets[name]
        self._handles: dict[str, BinaryIO] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._watched: list[weakref.finalize[Any, Any]] = []  # unwatch each map (on close, or once this is collected)
        self._opening = threading.Lock()  # the engine may read several tensors at once

    def file_of(self, name: str) -> str:
        return self._file.get(name, self.label)

    def get(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        path, spec = self._file[name], self.specs[name]
        offset = self._offset[name]
        if spec.nbytes == 0:
            return torch.empty(spec.shape, dtype=spec.dtype)
        handle = self._handle(path, name)
        if os.fstat(handle.fileno()).st_size < offset + spec.nbytes:  # a map past the end would crash on access
            raise MergelabError("file is truncated (changed since it was opened?)", file=path, tensor=name)
        if self.copies(name):
            return self._pread(handle, path, name, into)
        with self._opening:
            mapping = self._maps.get(path)
            if mapping is None:
                mapping = self._maps[path] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
                self._watched.append(weakref.finalize(self, sigbus.unwatch, sigbus.watch_mmap(mapping, path)))
        _advise(mapping, getattr(mmap, "MADV_WILLNEED", None), offset, spec.nbytes)
        data = torch.frombuffer(mapping, dtype=torch.uint8, count=spec.nbytes, offset=offset)
        return data.view(spec.dtype).reshape(spec.shape)

    def copies(self, name: str) -> bool:
        return self._offset[name] % self.specs[name].dtype.itemsize != 0  # unaligned: no view possible

    def release(self, name: str) -> None:
        # The pages go back to the page cache, not away: a later get() faults them in again. Pages
        # shared with a neighbouring tensor are dropped too, which costs that tensor a re-fault only.
        mapping = self._maps.get(self._file[name])
        if mapping is not None and self.specs[name].nbytes:
            _advise(mapping, getattr(mmap, "MADV_DONTNEED", None), self._offset[name], self.specs[name].nbytes)

    def _handle(self, path: str, name: str) -> BinaryIO:
        with self._opening:
            handle = self._handles.get(path)
            if handle is None:
                try:
                    handle = self._handles[path] = open(path, "rb", buffering=0)  # noqa: SIM115 (kept open)
                except OSError as err:
                    raise MergelabError(f"cannot read: {err.strerror}", file=path, tensor=name) from None
            return handle

    def _pread(self, handle: BinaryIO, path: str, name: str, into: torch.Tensor | None) -> torch.Tensor:
        spec = self.specs[name]
        buffer = torch.empty(spec.nbytes, dtype=torch.uint8) if into is None else into[: spec.nbytes]
        view = buffer.numpy().data
        done, offset = 0, self._offset[name]
        while done < spec.nbytes:  # a single read() returns at most ~2 GB
            count = os.preadv(handle.fileno(), [view[done:]], offset + done)
            if count <= 0:
                raise MergelabError("file is truncated (changed since it was opened?)", file=path, tensor=name)
            done += count
        return buffer.view(spec.dtype).reshape(spec.shape)

    def close(self) -> None:
        # The maps are not closed: tensors handed out may still view them (each keeps its map
        # alive), and closing a map under a live view would crash on the next access. They are no
        # longer watched: the merge that read them is over.
        for unwatch in self._watched:
            unwatch()  # once only: the slot may be another map's later
        self._watched.clear()
        self._maps.clear()
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def _advise(mapping: mmap.mmap, advice: int | None, offset: int, nbytes: int) -> None:
    """``madvise`` on the pages holding ``[offset, offset + nbytes)`` -- a hint: refusals are ignored."""
    if advice is None or not hasattr(mapping, "madvise"):
        return
    start = offset - offset % mmap.PAGESIZE
    try:
        mapping.madvise(advice, start, offset + nbytes - start)
    except OSError:  # an older kernel, or an advice this platform does not know
        pass
