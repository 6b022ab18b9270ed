"""What a killed run leaves beside its output, and how a later run tidies it up safely.

The writer works in hidden folders beside the target ``NAME``, each named after its owner::

    .NAME.mergelab-tmp-OWNER-RANDOM   being written
    .NAME.mergelab-new-OWNER-RANDOM   complete, about to replace NAME (--overwrite of a folder)
    .NAME.mergelab-old-OWNER-RANDOM   the previous NAME, moved aside until the new one is in place

``OWNER`` is ``MACHINE-BOOT-PID-START``: a hash of the host name and PID namespace, the boot id,
the process id and the process start time (clock ticks since boot), so that a reused PID or a
reboot is told apart from the run that made the folder. :func:`sweep` touches only folders whose
owner is provably gone: same machine and PID namespace, and either another boot or no live process
with that PID and start time. Folders of other machines, of live runs, or without an owner in
their name (older versions) are never touched. Small text files written with :func:`write_text` use
the same names (``.NAME.mergelab-tmp-OWNER-RANDOM`` files) and the same rule.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from mergelab.errors import MergelabError

KINDS = ("tmp", "new", "old")
_OWNER = re.compile(r"^(?P<kind>tmp|new|old)-(?P<machine>[0-9a-f]{8})-(?P<boot>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]+$")


@dataclass(frozen=True)
class Leftover:
    path: Path
    kind: str  # tmp, new or old
    machine: str
    boot: str
    pid: int
    start: int


def owner() -> str:
    """``MACHINE-BOOT-PID-START`` of this process (see the module docstring)."""
    pid = os.getpid()
    return f"{_machine()}-{_boot()}-{pid}-{_start_ticks(pid) or 0}"


def sibling(out: Path, kind: str, tag: str | None = None) -> Path:
    """A hidden name beside ``out`` for this process: ``tag`` (owner + random part) pairs the
    tmp, new and old folders of one run."""
    return out.parent / f".{out.name}.mergelab-{kind}-{tag or new_tag()}"


def new_tag() -> str:
    return f"{owner()}-{secrets.token_hex(4)}"


def tag_of(path: Path) -> str:
    """The owner + random part of a name made by :func:`sibling`."""
    return path.name.split(".mergelab-", 1)[1].split("-", 1)[1]


def leftovers(out: Path, files: bool = False) -> list[Leftover]:
    """Every owner-named folder beside ``out`` (any owner, dead or alive); with ``files``, the
    owner-named temporary files of :func:`write_text` instead."""
    prefix = f".{out.name}.mergelab-"
    try:
        names = [p for p in out.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:  # no parent folder (yet): nothing left there
        return []
    found = []
    for path in names:
        match = _OWNER.match(path.name[len(prefix):])
        if match and (path.is_file() if files else path.is_dir()) and not path.is_symlink():
            found.append(Leftover(path, match["kind"], match["machine"], match["boot"], int(match["pid"]),
                                  int(match["start"])))
    return found


def is_stale(item: Leftover) -> bool:
    """Whether the run that made ``item`` is provably gone (never true for another machine)."""
    if item.machine != _machine():
        return False
    if item.boot != _boot():
        return True
    return not _alive(item.pid, item.start)


def restorable(out: Path) -> Path | None:
    """What :func:`sweep` would put back at a missing ``out``: the newest complete new output of a
    dead run, else the previous output a dead run moved aside; ``None`` if ``out`` exists."""
    if os.path.lexists(out):
        return None
    stale = [item for item in leftovers(out) if item.kind in ("new", "old") and is_stale(item)]
    for kind in ("new", "old"):
        candidates = [item.path for item in stale if item.kind == kind]
        if candidates:
            return max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name))
    return None


def sweep(out: Path) -> None:
    """Finish or undo a replace of ``out`` that a killed run left half done, and remove the other
    folders dead runs left beside ``out``. Raises MergelabError if the output cannot be put back."""
    back = restorable(out)
    if back is not None:
        try:
            os.replace(back, out)
        except OSError as err:
            raise MergelabError(f"cannot put back the output an interrupted run left as {back.name} "
                                f"({err.strerror or err})", file=str(out)) from None
    for item in leftovers(out):
        if item.path != back and is_stale(item):
            discard(item.path)


def write_text(path: Path, text: str) -> None:
    """Write a small text file (a report, a result, a cache entry) atomically: into
    ``.NAME.mergelab-tmp-OWNER-RANDOM`` beside it, renamed over ``path`` when complete. Such files
    that killed runs left beside ``path`` (owner provably gone) are removed first."""
    for item in leftovers(path, files=True):
        if is_stale(item):
            item.path.unlink(missing_ok=True)
    tmp = sibling(path, "tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_dir(path.parent)


def sync_dir(folder: Path) -> None:
    """fsync a folder, so that renames and new entries in it are on disk (where the platform allows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory descriptors
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems refuse fsync on a directory: nothing more to do
        pass
    finally:
        os.close(descriptor)


def discard(path: Path) -> None:
    """Remove a folder made by :func:`sibling`, renamed to the tmp kind first: a removal cut short
    never leaves a partial folder that looks complete (new) or restorable (old)."""
    head, _, rest = path.name.partition(".mergelab-")
    kind, _, tag = rest.partition("-")
    if kind in ("new", "old"):
        doomed = path.with_name(f"{head}.mergelab-tmp-{tag}")
        try:
            os.replace(path, doomed)
            path = doomed
        except OSError:  # a tmp folder of that name is still there: remove in place
            pass
    shutil.rmtree(path, ignore_errors=True)


def _machine() -> str:
    """This host and PID namespace: PIDs are only comparable within one."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return hashlib.sha256(f"{socket.gethostname()}|{namespace}".encode()).hexdigest()[:8]


def _boot() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip().replace("-", "")[:8].ljust(8, "0")
    except OSError:  # not Linux: every folder looks like this boot's, and liveness is the PID's alone
        return "0" * 8


def _start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks after boot), ``None`` if there is no such
    live process; 0 where ``/proc`` cannot say."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3
    except FileNotFoundError:
        return None
    except OSError:
        return 0
    if fields[0] in ("Z", "X"):  # killed, not yet reaped: gone all the same
        return None
    return int(fields[19])  # field 22, starttime


def _alive(pid: int, start: int) -> bool:
    if os.path.isdir("/proc/self"):
        ticks = _start_ticks(pid)
        return ticks is not None and (ticks == start or start == 0 or ticks == 0)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True
