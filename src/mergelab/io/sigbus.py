"""A clean exit, instead of a crash, when another process truncates an input while it is being read.

Inputs are memory-mapped (safetensors files by :class:`~mergelab.io.sources.SafetensorsSource`,
zip ``.bin``/``.pt`` files by ``torch.load(mmap=True)``). If another process truncates a file while
a merge reads it, touching a page past the new end raises SIGBUS, which Python cannot handle (its
handler returns to the faulting read, which faults again): the process died of "Bus error" (exit
135) with no word about which file. ``sigbus.cpp`` (beside this module) is a small C++ signal handler,
installed with ``sigaction(SA_SIGINFO)``, that looks the faulting address up in the mappings watched
here: for one of them it prints ``mergelab: error: FILE: file changed size while being read
(truncated by another process?)``, removes the files of the output folder being written (the
writer's temporary folder, registered with :func:`output_folder`) and exits with status 2. Any
other SIGBUS goes to the handler installed before (by default the process dies as it would have).
The handler ends the whole process: in a program that calls :func:`mergelab.merge`, too (where it
would have died of SIGBUS).

Each source still checks the file's size before each tensor (a clean :class:`MergelabError`, with
the usual clean-up, when the file shrank before the read); the handler covers the window between
that check and the read. The cost is one registration per input file opened: nothing per tensor.

The source is compiled like the engine's kernels (:mod:`mergelab.ops.native`: the system's C++
compiler, into ``$MERGELAB_CACHE/native``, reused when owned by this user and not writable by
others). Without a compiler, or with ``MERGELAB_NATIVE=0``, nothing is installed: a truncation in
that window ends the process with SIGBUS as before, and the output's temporary folder stays until
a later run removes it.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergelab.native_build import build_library

SOURCE = Path(__file__).with_name("sigbus.cpp")
_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared")
_ABI_VERSION = 1

log = logging.getLogger(__name__)

_LIBRARY: ctypes.CDLL | None = None
_TRIED = False
_LOCK = threading.Lock()


def available() -> bool:
    """Whether the handler can be used here (built on first use; decided once per process)."""
    return _library() is not None


def watch(address: int, length: int, path: str) -> int | None:
    """Watch ``[address, address + length)``, a mapping of ``path``; returns a slot for :func:`unwatch`,
    or None where the handler is not available."""
    library = _library()
    if library is None or length <= 0:
        return None
    slot = int(library.mergelab_sigbus_watch(address, length, os.fsencode(path)))
    return slot if slot >= 0 else None


def watch_mmap(mapping: mmap.mmap, path: str) -> int | None:
    """:func:`watch` the whole of a Python memory map (its address read through a ctypes view)."""
    if len(mapping) == 0 or _library() is None:
        return None
    view = ctypes.c_char.from_buffer(mapping)  # a buffer export: released below, so the map can close later
    try:
        address = ctypes.addressof(view)
    finally:
        del view
    return watch(address, len(mapping), path)


def unwatch(slot: int | None) -> None:
    library = _LIBRARY
    if slot is not None and library is not None:
        library.mergelab_sigbus_unwatch(slot)


@contextmanager
def output_folder(folder: Path | None) -> Iterator[None]:
    """While the block runs, a fault in a watched mapping also removes ``folder``'s files and ``folder``."""
    library = _library() if folder is not None else None
    if library is None:
        yield
        return
    library.mergelab_sigbus_output(os.fsencode(str(folder)))
    try:
        yield
    finally:
        library.mergelab_sigbus_output(None)


def _library() -> ctypes.CDLL | None:
    global _LIBRARY, _TRIED
    if not _TRIED:
        with _LOCK:
            if not _TRIED:
                _LIBRARY, _TRIED = _load(), True
    return _LIBRARY


def _load() -> ctypes.CDLL | None:
    if os.environ.get("MERGELAB_NATIVE", "1") == "0" or not hasattr(os, "fork"):  # no POSIX signals
        return None
    try:
        library = ctypes.CDLL(str(build()))
        if library.mergelab_sigbus_abi_version() != _ABI_VERSION:
            raise OSError("stale library")
    except (OSError, subprocess.SubprocessError) as err:
        reason = (str(err).strip().splitlines() or [repr(err)])[0]
        log.debug("no SIGBUS handler for truncated inputs (%s)", reason)
        return None
    library.mergelab_sigbus_watch.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_char_p]
    library.mergelab_sigbus_watch.restype = ctypes.c_int
    library.mergelab_sigbus_unwatch.argtypes = [ctypes.c_int]
    library.mergelab_sigbus_unwatch.restype = None
    library.mergelab_sigbus_output.argtypes = [ctypes.c_char_p]
    library.mergelab_sigbus_output.restype = None
    return library


def build(cache_dir: Path | None = None) -> Path:
    """Compile ``sigbus.cpp`` into the cache (once per source, flags and compiler) and return the library's path."""
    return build_library(SOURCE, "sigbus", (_FLAGS,), link=("-lpthread",), cache_dir=cache_dir)

