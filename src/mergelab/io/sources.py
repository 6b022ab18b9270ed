"""Every "model-like" input behind one lazy interface: name -> tensor, read one at a time.

Accepted (see docs/api.md): a state dict, a ``torch.nn.Module``, a ``.safetensors`` file, a
Hugging Face folder (``model.safetensors``, sharded safetensors + index, ``pytorch_model.bin``,
sharded ``.bin`` + index), or a ``.bin``/``.pt``/``.pth`` file. Torch pickles are loaded with
``weights_only=True`` and memory-mapped, never executed.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mergelab.errors import MergelabError
from mergelab.io import sigbus
from mergelab.io.names import resolve_model_name
from mergelab.io.safetensors_header import DTYPE_NAMES, TensorSpec, read_header

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
FULL_WEIGHTS = (SAFE_INDEX, BIN_INDEX, "model.safetensors", "pytorch_model.bin")  # in the order they are preferred
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")  # PEFT's
ADAPTER_MESSAGE = ("a LoRA/PEFT adapter, not a full model: merge it into its base model first (e.g. with PEFT's "
                   "merge_and_unload()) and pass the merged model")
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


def open_source(model: Any, label: str | None = None) -> TensorSource:
    """Dispatch a model-like input to its lazy reader; raises MergelabError if it is not one."""
    model = resolve_model_name(model)  # a backbone name -> its packaged folder (mergelab.io.names)
    if isinstance(model, TensorSource):
        return model
    if isinstance(model, torch.nn.Module):
        return DictSource(model.state_dict(), label or type(model).__name__)
    if isinstance(model, Mapping):
        return DictSource(model, label or "<state dict>")
    if not isinstance(model, (str, os.PathLike)):
        raise MergelabError(f"not a model: {type(model).__name__} (expected a path, state dict or nn.Module)")
    path = Path(model)
    text = str(path)
    if path.is_dir():
        return _open_folder(path)
    if not path.exists():
        raise MergelabError("no such file or folder", file=text)
    if path.name.startswith("adapter_model."):
        raise MergelabError(ADAPTER_MESSAGE, file=text)
    if path.suffix == ".safetensors":
        return SafetensorsSource([text], text)
    if path.suffix in TORCH_SUFFIXES:
        return TorchSource([text], text)
    if path.suffix == ".json" and path.name.endswith("index.json"):
        return _open_folder(path.parent)
    raise MergelabError("unknown checkpoint format (expected .safetensors, .bin, .pt, .pth or a model folder)", file=text)


def _open_folder(folder: Path) -> TensorSource:
    """The folder's full-model weights (an index first, then a single file; safetensors before ``.bin``);
    the plan says which one where a folder holds several."""
    present = [name for name in FULL_WEIGHTS if (folder / name).is_file()]
    if not present and any((folder / name).is_file() for name in ADAPTER_FILES):
        raise MergelabError(ADAPTER_MESSAGE, file=str(folder))
    source = _open_weights(folder)
    chosen = next((name for name in FULL_WEIGHTS if (folder / name).is_file()), None)
    unused = [name for name in (*present, *ADAPTER_FILES[1:]) if name != chosen and (folder / name).is_file()
              and not (chosen in (SAFE_INDEX, BIN_INDEX) and str(folder / name) in source.files)]
    if chosen is not None and unused:
        source.warnings = (*source.warnings, f"{folder} holds {chosen} and {', '.join(unused)}: using {chosen}, "
                           f"the other{'s are' if len(unused) > 1 else ' is'} ignored",)
    return source


def _open_weights(folder: Path) -> TensorSource:
    label = str(folder)
    for index_name, cls in ((SAFE_INDEX, SafetensorsSource), (BIN_INDEX, TorchSource)):
        index_path = folder / index_name
        if index_path.exists():
            weight_map = _read_index(index_path)
            files = []
            for shard in sorted(set(weight_map.values())):
                shard_path = folder / shard
                if Path(shard).name != shard or not shard_path.is_file():
                    tensor = next(n for n, s in weight_map.items() if s == shard)
                    raise MergelabError(f"index names missing shard {shard!r}", file=str(index_path), tensor=tensor)
                files.append(str(shard_path))
            source = cls(files, label, folder)
            _check_index(weight_map, {n: source.file_of(n) for n in source.specs}, str(index_path))
            return source
    for single, cls in (("model.safetensors", SafetensorsSource), ("pytorch_model.bin", TorchSource)):
        if (folder / single).is_file():
            return cls([str(folder / single)], label, folder)
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return SafetensorsSource([str(folder / found[0])], label, folder)
    raise MergelabError("no checkpoint found in folder (expected model.safetensors, an index, or pytorch_model.bin)", file=label)


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        data = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MergelabError(f"unreadable index ({err})", file=str(index_path)) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MergelabError("index has no valid 'weight_map'", file=str(index_path))
    if not weight_map:
        raise MergelabError("index lists no tensors (empty 'weight_map')", file=str(index_path))
    return {str(k): v for k, v in weight_map.items()}


def _check_index(index: dict[str, str], found: dict[str, str], index_file: str) -> None:
    """The index and the shards' headers must agree on every tensor and its shard."""
    for name, shard in index.items():
        if name not in found:
            raise MergelabError(f"index lists the tensor in {shard} but no shard holds it", file=index_file, tensor=name)
        if Path(found[name]).name != shard:
            raise MergelabError(f"index says {shard} but it is in {Path(found[name]).name}", file=index_file, tensor=name)
    for name, path in found.items():
        if name not in index:
            raise MergelabError("tensor is in a shard but not in the index", file=path, tensor=name)

