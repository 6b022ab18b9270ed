"""Compile a bundled C++ source into a shared library in mergelab's cache, once, and refuse to load
compiled code that another user could have written. Used by the compiled kernels (``ops.native``)
and the SIGBUS handler (``io.sigbus``)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path


def build_library(source: Path, stem: str, flag_sets: Sequence[Sequence[str]], *, key_extra: bytes = b"",
                  link: Sequence[str] = (), cache_dir: Path | None = None) -> Path:
    """Compile ``source`` into ``CACHE/native/STEM-KEY.so`` unless it is there, and return its path.

    The key hashes the source, the first flag set, the compiler's version and ``key_extra`` (e.g. the CPU's
    features for ``-march=native``); each flag set is tried in turn (some compilers lack a flag). Built
    aside and renamed into place: never half-written. Raises ``OSError`` (no compiler, a failed build, an
    untrusted cache) or ``subprocess.SubprocessError``."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise OSError("no C++ compiler found (set CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    key = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join(flag_sets[0]).encode(), version.encode(),
                                     key_extra])).hexdigest()
    root = cache_dir or Path(os.environ.get("MERGELAB_CACHE", Path.home() / ".cache" / "mergelab")) / "native"
    target = root / f"{stem}-{key[:16]}.so"
    if target.exists():
        check_trusted(root)
        check_trusted(target)
        return target
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_trusted(root)
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        built = Path(scratch) / target.name
        for flags in flag_sets:
            result = subprocess.run([compiler, *flags, "-o", str(built), str(source), *link], capture_output=True,
                                    text=True, timeout=600)
            if result.returncode == 0:
                break
        else:
            errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines() or ["?"]
            raise OSError(f"{compiler} failed on {source.name}: {errors[0].strip()}")
        os.replace(built, target)
    return target


def check_trusted(path: Path) -> None:
    """Loading a library runs its code: refuse one (or a folder) that another user owns or may write."""
    if not hasattr(os, "getuid"):
        return  # no POSIX ownership to check
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise OSError(f"{path} is not owned by this user or is writable by others; not loading compiled code from it")
