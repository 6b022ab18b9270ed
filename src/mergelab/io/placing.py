"""Where an output may go, and putting a finished one there: the checks on the target (apart from every
input, not an existing output unless overwriting) and the atomic rename or replace of a staged file or
folder, with SIGINT/SIGTERM held until it is done."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mergelab.errors import MergelabError
from mergelab.io import leftovers
from mergelab.io.sources import SafetensorsSource, TensorSource, TorchSource


def check_output(out: Path, overwrite: bool) -> None:
    """An existing output is an error unless ``overwrite``; raises MergelabError. An output that a
    killed run's leftovers would put back (:func:`mergelab.io.leftovers.restorable`) counts as existing."""
    back = leftovers.restorable(out)
    exists = out.exists() or back is not None
    if exists and not overwrite:
        left = f"; an interrupted run left it as {back.name}, which the next merge puts back" if back else ""
        raise MergelabError(f"output already exists (pass --overwrite / overwrite=True to replace it){left}", file=str(out))
    if out.exists() and (out.suffix == ".safetensors") != out.is_file():
        raise MergelabError("output exists and is of the other kind (file vs folder)", file=str(out))
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MergelabError(f"cannot create the output: {parent} is not a folder", file=str(out))


def input_paths(sources: Iterable[TensorSource]) -> list[Path]:
    """The files and folders that ``sources`` read (none for in-memory inputs)."""
    paths: set[str] = set()
    for source in sources:
        if isinstance(source, (SafetensorsSource, TorchSource)):
            paths.update([source.label, *(source.file_of(name) for name in source.specs)])
            if source.folder is not None:
                paths.add(str(source.folder))
    return sorted(Path(p) for p in paths)


def check_apart(out: Path, inputs: Iterable[Path]) -> None:
    """``out`` is not one of ``inputs``, not inside an input folder, and holds no input (which an
    overwrite would delete), however either is spelled (symlinks, ``..``, another name of the same
    folder). Raises MergelabError."""
    pairs = [(path, target, real) for path in inputs for target, real in itertools.product(_spellings(out), _spellings(path))]
    for path, target, real in pairs:
        if _same(target, real):
            raise MergelabError(f"the output is an input of this job ({path}): it would be replaced", file=str(out))
    for path, target, real in pairs:
        if any(_same(folder, real) for folder in target.parents):
            raise MergelabError(f"the output is inside an input folder ({path})", file=str(out))
        if any(_same(folder, target) for folder in real.parents):
            raise MergelabError(f"an input of this job ({path}) is inside the output", file=str(out))


def check_new_folder(folder: Path, inputs: Iterable[Path] = ()) -> None:
    """``folder`` is absent or an empty folder, and apart from ``inputs``: somewhere to create
    files without mixing them into someone else's. Raises MergelabError."""
    if os.path.lexists(folder) and not folder.is_dir():
        raise MergelabError("exists and is not a folder", file=str(folder))
    if folder.is_dir() and any(folder.iterdir()):
        raise MergelabError("folder exists and is not empty (give a new or empty folder)", file=str(folder))
    check_apart(folder, inputs)


def _spellings(path: Path) -> set[Path]:
    """``path`` absolute as written (``..`` folded) and with every symlink resolved."""
    return {Path(os.path.abspath(path)), path.resolve()}


def _same(a: Path, b: Path) -> bool:
    """The same file or folder: by identity where both exist (bind mounts, case-insensitive names), else by path."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@contextmanager
def io_errors(shown: Path) -> Iterator[None]:
    """An OSError (disk full, permissions, ...) as a one-line MergelabError naming ``shown``."""
    try:
        yield
    except OSError as err:
        raise MergelabError(f"cannot write the output ({err.strerror or err})", file=str(shown)) from None


def place(staged: Path, out: Path, tag: str, *, overwrite: bool, single: bool = False) -> None:
    """Move the complete, synced output ``staged`` to ``out``, SIGINT/SIGTERM held until the renames are
    done. A ``single`` file (``staged/out.name``) replaces an old one with one atomic rename. A folder is
    renamed ``.NAME.mergelab-new-TAG`` (complete) before anything is replaced, the old ``out`` moved aside
    as ``.NAME.mergelab-old-TAG``, the new one renamed into place and the old one removed: a kill at any
    point leaves the old or the new output at ``out``, or both beside it for the next run's
    :func:`mergelab.io.leftovers.sweep`. On an error the new folder is removed and the previous output put
    back (or named, for the next run to put back). Raises MergelabError."""
    placed, held = False, list[int]()
    try:
        with _signals_held(held):
            if out.exists() and not overwrite:
                raise MergelabError("output appeared while merging (another run?); nothing was replaced", file=str(out))
            if single:
                with io_errors(out):
                    os.replace(staged / out.name, out)
                _remove(staged)
            else:
                _replace_folder(staged, out, tag)
            placed = True
    finally:
        _deliver(held, out if placed else None)


def _replace_folder(staged: Path, out: Path, tag: str) -> None:
    new = leftovers.sibling(out, "new", tag)
    with io_errors(out):
        os.replace(staged, new)  # marks it complete: from here on a later run may move it into place
    try:
        old = None
        if os.path.lexists(out):  # a folder cannot be renamed over: the old one is moved aside first
            old = leftovers.sibling(out, "old", tag)
            with io_errors(out):
                os.replace(out, old)
        try:
            os.replace(new, out)
        except OSError as err:
            if old is not None:
                try:
                    os.replace(old, out)  # put the previous output back
                except OSError:
                    raise MergelabError(f"cannot move the output into place ({err.strerror or err}); the previous "
                                        f"output is at {old.name}, and the next run puts it back", file=str(out)) from None
            raise MergelabError(f"cannot move the output into place ({err.strerror or err})", file=str(out)) from None
    except BaseException:
        leftovers.discard(new)
        raise
    leftovers.sync_dir(out.parent)
    if old is not None:
        leftovers.discard(old)


@contextmanager
def _signals_held(held: list[int]) -> Iterator[None]:
    """SIGINT and SIGTERM arriving in the block are held (listed in ``held``) until it is done: the
    renames that put an output in place run to their end. Main thread only (Python runs handlers
    nowhere else)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous = {sig: handler for sig, handler in previous.items() if handler is not None}  # None: set outside Python
    for sig in previous:
        signal.signal(sig, lambda number, _frame: held.append(number))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _deliver(held: list[int], written: Path | None) -> None:
    """Act on a signal held during the renames; if they put ``written`` in place, the interruption says so."""
    if not held:
        return
    try:
        signal.raise_signal(held[0])
    except KeyboardInterrupt as err:
        if written is not None:
            err.args = (f"interrupted after {written} was written",)
        raise


def sync_tree(folder: Path, synced: set[str]) -> None:
    """fsync the files under ``folder`` not yet synced, then the folders (so that the completed
    folder is on disk before it is marked complete)."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file() and path.name not in synced:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            leftovers.sync_dir(path)
    leftovers.sync_dir(folder)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
