"""How many threads mergelab computes on, and how they wait: one policy for every entry point.

The budget is the number of CPUs this process may really use -- the smallest of its affinity mask
(``os.sched_getaffinity``), its cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``; a fractional quota rounded up), ``OMP_NUM_THREADS`` when set and, inside a
Ray task, the CPUs Ray assigned to it -- never more. ``--threads N`` (CLI) or ``MERGELAB_THREADS=N``
override it; ``MERGELAB_THREADS=legacy`` turns the policy off (torch's and the BLAS's own defaults,
OpenMP's default waiting: the behaviour before the policy, kept for comparisons).

Torch's intra-op threads, NumPy's BLAS and mergelab's own chunk and tensor workers (which the engine
sizes from torch's thread count, ``engine.stream``) share the budget instead of each taking every
core; SciPy's BLAS runs on one thread inside the spectral methods already (``methods._lapack``).

OpenMP's threads spin between parallel regions by default (libgomp: ~300 000 iterations; LLVM/Intel:
200 ms of ``KMP_BLOCKTIME``), which on a shared machine steals the core another process is waiting
for: measured on 2 cores next to one busy process, an OPCM step took 4.6x its time alone with the
default and 2.6x with ``OMP_WAIT_POLICY=PASSIVE``. The runtimes read that variable once, when torch
loads them, so only the command line (and Ray workers it starts) can set it: :func:`before_torch`
runs before ``import torch``. A Python program that imports torch itself must set it in its
environment before that import; mergelab's Python API cannot change it afterwards.

Everything that parses takes its inputs (file contents, environment mappings) as arguments.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

ENV = "MERGELAB_THREADS"
LEGACY = "legacy"
CGROUP_ROOT = "/sys/fs/cgroup"
# variables a user sets to tune OpenMP's waiting: if any is set, mergelab sets none
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
_SET_BY_US = "_MERGELAB_SET_WAIT_POLICY"  # marks OMP_WAIT_POLICY as mergelab's (inherited by Ray workers)


@dataclass(frozen=True)
class Limits:
    """The CPU limits of this process, as found (None: no such limit)."""

    affinity: int
    quota: int | None = None
    omp: int | None = None
    ray: int | None = None


@dataclass(frozen=True)
class Policy:
    """The thread policy chosen: ``threads`` None means the policy is off (``legacy``)."""

    threads: int | None
    source: str
    limits: Limits
    wait: str = ""

    def describe(self) -> str:
        """Two lines for ``mergelab plan``: the thread count and its source, and OpenMP's waiting."""
        found = self.limits
        seen = [f"affinity {found.affinity}", f"cgroup quota {found.quota if found.quota is not None else 'none'}"]
        if found.omp is not None:
            seen.append(f"OMP_NUM_THREADS {found.omp}")
        if found.ray is not None:
            seen.append(f"Ray task {found.ray}")
        if self.threads is None:
            head = f"threads       not managed ({ENV}={LEGACY}: torch's and the BLAS libraries' own defaults)"
        else:
            head = (f"threads       {self.threads} from {self.source} ({', '.join(seen)}); torch, NumPy's BLAS and "
                    f"mergelab's workers share them")
        return f"{head}\nopenmp wait   {self.wait or wait_state(os.environ)}"


# ---- parsing (pure) --------------------------------------------------------------------------------------

def quota_cpus(quota: float | None) -> int | None:
    """A CPU quota in CPUs (``1.5``) as whole threads: rounded up, at least 1; None stays None."""
    if quota is None:
        return None
    return max(1, math.ceil(quota - 1e-9))


def cgroup_v2_quota(cpu_max: str | None) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` (``"QUOTA PERIOD"``, ``"max PERIOD"``: no limit)."""
    if not cpu_max:
        return None
    parts = cpu_max.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_v1_quota(quota: str | None, period: str | None) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (a quota of -1: no limit)."""
    if not quota or not period:
        return None
    try:
        q, p = int(quota.strip()), int(period.strip())
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _ancestors(mount: str, path: str) -> list[str]:
    """``mount/path`` and each folder above it up to ``mount`` itself (a container sees its own cgroup as the
    mount's root while ``/proc/self/cgroup`` may name the host's path, absent here: the walk ends at the root)."""
    inner = PurePosixPath("/", path.strip() or "/")
    folders = [inner, *inner.parents]
    return [str(PurePosixPath(mount, *folder.parts[1:])) for folder in folders]


def cgroup_cpus(read: Callable[[str], str | None], self_cgroup: str | None, root: str = CGROUP_ROOT) -> int | None:
    """Whole CPUs allowed by the cgroup quotas of this process and its parent cgroups (the tightest; None: none).

    ``read(path)`` returns a file's text or None when it is missing; ``self_cgroup`` is
    ``/proc/self/cgroup``'s text (None: unknown -- the root's files only). Both hierarchies are looked at
    (hybrid set-ups mount v1's ``cpu`` controller next to a v2 tree)."""
    v2_path, v1_path = "/", None
    for line in (self_cgroup or "").splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":
            v2_path = path
        elif "cpu" in controllers.split(","):
            v1_path = path
    quotas: list[float] = []
    for folder in _ancestors(root, v2_path):
        found = cgroup_v2_quota(read(f"{folder}/cpu.max"))
        if found is not None:
            quotas.append(found)
    for mount in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
        for folder in _ancestors(f"{root}/{mount}", v1_path or "/"):
            found = cgroup_v1_quota(read(f"{folder}/cpu.cfs_quota_us"), read(f"{folder}/cpu.cfs_period_us"))
            if found is not None:
                quotas.append(found)
    return quota_cpus(min(quotas)) if quotas else None


def omp_threads(env: Mapping[str, str]) -> int | None:
    """``OMP_NUM_THREADS`` as a number (its first level if nested: ``"4,2"`` -> 4); None if unset or invalid."""
    value = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def parse_request(value: object) -> int | str | None:
    """``--threads`` / ``MERGELAB_THREADS``: a positive number, ``auto`` (None) or ``legacy``; anything else
    raises MergelabError."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "auto"):
            return None
        if text == LEGACY:
            return LEGACY
        if text.isdigit() and int(text) >= 1:
            return int(text)
    from mergelab.errors import MergelabError

    raise MergelabError(f"threads: give a positive number, auto or {LEGACY}, got {value!r}")


def choose(requested: object = None, env: Mapping[str, str] | None = None, found: Limits | None = None) -> Policy:
    """The policy, from (first that applies) ``requested`` (``--threads``), ``MERGELAB_THREADS``, and the
    tightest of the limits ``found`` (default: this process's, :func:`limits`). In a Ray task the CPUs Ray
    gave it are the budget whatever ``MERGELAB_THREADS`` says (the driver divided its own budget among the
    tasks); ``legacy`` still turns the policy off there."""
    env = os.environ if env is None else env
    found = limits(env) if found is None else found
    wanted = parse_request(requested)
    from_env = parse_request(env.get(ENV))
    if wanted == LEGACY or (wanted is None and from_env == LEGACY):
        return Policy(None, f"{ENV}={LEGACY}" if wanted is None else f"--threads {LEGACY}", found)
    if isinstance(wanted, int):
        return Policy(wanted, "--threads", found)
    if isinstance(from_env, int) and found.ray is None:
        return Policy(from_env, ENV, found)
    candidates = [("the Ray task's CPUs", found.ray), ("the cgroup CPU quota", found.quota),
                  ("OMP_NUM_THREADS", found.omp), ("the affinity mask", found.affinity)]
    threads = min(n for _, n in candidates if n is not None)
    source = next(name for name, n in candidates if n == threads)
    return Policy(max(1, threads), source, found)


def split(total: int, runs: int, per_node: int | None = None) -> int:
    """Threads (Ray: CPUs) for each of ``runs`` parallel runs sharing ``total``: an equal share, at least 1
    (more runs than CPUs: one each, and they queue), at most ``per_node`` (a task runs on one machine)."""
    share = max(1, total // max(1, min(runs, total)))
    return max(1, min(share, per_node)) if per_node else share


# ---- OpenMP's waiting ------------------------------------------------------------------------------------

def wait_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables to set so that OpenMP's threads sleep when they wait: ``OMP_WAIT_POLICY=PASSIVE``
    (libgomp: no spinning; LLVM/Intel: ``KMP_BLOCKTIME`` 0), unless the user tuned waiting or turned the
    policy off."""
    if any(name in env for name in WAIT_VARIABLES) or env.get(ENV, "").strip().lower() == LEGACY:
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE", _SET_BY_US: "1"}


def wait_state(env: Mapping[str, str]) -> str:
    """What OpenMP's waiting is, in words (for ``mergelab plan``)."""
    if _SET_BY_US in env and env.get("OMP_WAIT_POLICY") == "PASSIVE":
        return "PASSIVE (set by mergelab before torch loaded: idle threads sleep instead of spinning)"
    tuned = [f"{name}={env[name]}" for name in WAIT_VARIABLES if name in env]
    if tuned:
        return f"{', '.join(tuned)} (from the environment)"
    return ("the OpenMP runtime's default (spins before sleeping; set OMP_WAIT_POLICY=PASSIVE before torch is "
            "imported on a shared machine)")


def launched_as_cli(argv: list[str]) -> bool:
    """Whether this process is the ``mergelab`` command: its console script, or ``python -m mergelab``
    (while ``-m`` locates its module, ``sys.argv[0]`` is ``"-m"``)."""
    if not argv:
        return False
    name = argv[0].replace("\\", "/").rpartition("/")[2].lower()
    return argv[0] == "-m" or name in ("mergelab", "mergelab.exe", "mergelab-script.py")


def cli_threads(args: list[str]) -> str | None:
    """The value of ``--threads`` anywhere in a command line's arguments (before a lone ``--``), else None."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg.startswith("--threads="):
            return arg.partition("=")[2]
        if arg == "--threads" and i + 1 < len(args):
            return args[i + 1]
    return None


def hoist_threads(args: list[str]) -> list[str]:
    """A command line with ``--threads`` moved to the front, so that it may also follow the command
    (``mergelab merge ... --threads 2``) although it is the top-level parser's option."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg.startswith("--threads="):
            return [arg, *args[:i], *args[i + 1:]]
        if arg == "--threads" and i + 1 < len(args):
            return [arg, args[i + 1], *args[:i], *args[i + 2:]]
    return list(args)


def before_torch(argv: list[str] | None = None, env: dict[str, str] | Any = None) -> bool:
    """In the ``mergelab`` command, before torch is imported: OpenMP's threads sleep when they wait
    (:func:`wait_env`). True if the environment was changed. Nothing in a Python program that imports
    mergelab (its environment is its own) or once torch is loaded (too late to take effect)."""
    env = os.environ if env is None else env
    argv = sys.argv if argv is None else argv
    if "torch" in sys.modules or not launched_as_cli(argv):
        return False
    if (cli_threads(argv[1:]) or "").strip().lower() == LEGACY:
        return False
    changes = wait_env(env)
    env.update(changes)
    return bool(changes)


# ---- this process ----------------------------------------------------------------------------------------

def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (all of the machine's where the platform has no mask)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def ray_cpus() -> int | None:
    """CPUs Ray assigned to this process's current task (None outside a Ray worker; Ray is never imported)."""
    ray = sys.modules.get("ray")
    if ray is None:
        return None
    try:
        if not ray.is_initialized():
            return None
        context = ray.get_runtime_context()
        if context.worker.mode != ray._private.worker.WORKER_MODE:
            return None
        cpus = context.get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001  (any Ray version or state: then no Ray limit)
        return None
    return quota_cpus(float(cpus)) if cpus else None


def limits(env: Mapping[str, str] | None = None) -> Limits:
    """This process's CPU limits (reads the affinity mask, the cgroup files and, in a Ray task, Ray's share)."""
    env = os.environ if env is None else env
    quota = cgroup_cpus(_read, _read("/proc/self/cgroup")) if sys.platform.startswith("linux") else None
    return Limits(affinity=affinity_cpus(), quota=quota, omp=omp_threads(env), ray=ray_cpus())


_applied: Policy | None = None


def apply(policy: Policy, *, own_process: bool = True) -> Policy:
    """Put ``policy`` into effect: torch's intra-op threads and the loaded BLAS libraries' threads
    (threadpoolctl) to the budget; mergelab's workers follow torch's count. ``own_process`` (the CLI, a Ray
    task): exactly the budget; else (the Python API: the caller may have chosen fewer) only ever lowered.
    Returns the policy in effect (its count is then what torch runs on)."""
    global _applied
    if policy.threads is None:
        _applied = Policy(None, policy.source, policy.limits, wait_state(os.environ))
        return _applied
    import torch

    threads, source = policy.threads, policy.source
    current = torch.get_num_threads()
    if not own_process and current < threads:
        threads, source = current, "torch's own setting (below the budget of this process: kept)"
    if current != threads:
        torch.set_num_threads(threads)
    _limit_blas(threads, lower_only=not own_process)
    _applied = Policy(threads, source, policy.limits, wait_state(os.environ))
    return _applied


def _limit_blas(threads: int, lower_only: bool) -> None:
    """The BLAS libraries loaded so far (NumPy's) to at most ``threads`` threads."""
    try:
        from threadpoolctl import ThreadpoolController  # type: ignore[import-untyped]
    except ImportError:  # an optional speed-up only
        return
    for library in ThreadpoolController().lib_controllers:
        if library.user_api == "blas" and (library.num_threads > threads or not lower_only):
            library.set_num_threads(threads)


def ensure() -> Policy:
    """The Python API's hook (``merge``, ``plan``, ``ContinualMerger``, experiments, searches): the policy,
    applied once per process and only ever lowering what the caller set (the command line applies its own
    first). Afterwards ``torch.set_num_threads`` is the caller's to change."""
    return _applied if _applied is not None else apply(choose(), own_process=False)


def in_task() -> Policy:
    """A Ray task's hook: this worker's share of the budget (the CPUs Ray gave the task), exactly."""
    return apply(choose(), own_process=True)


def budget() -> int | None:
    """The thread budget in effect (None: the policy is off)."""
    return ensure().threads


def ray_task_cpus(jobs: int, ray: Any) -> int:
    """CPUs for each of ``jobs`` Ray tasks: the cluster's CPUs divided among the tasks that can run at once,
    at most the CPUs of its largest node; 1 with the policy off (every task one CPU, as before)."""
    if budget() is None:
        return 1
    try:
        total = int(ray.cluster_resources().get("CPU", 1))
        per_node = max((int(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes() if node.get("Alive")),
                       default=total)
    except Exception:  # noqa: BLE001  (a cluster that does not say: one CPU each)
        return 1
    return split(total, jobs, per_node or total)


def worker_env() -> dict[str, str]:
    """Environment for the Ray workers this process starts (they import torch before any mergelab code
    runs): OpenMP's waiting as set here, else passive (the workers are mergelab's), and the policy switch."""
    keep = (*WAIT_VARIABLES, _SET_BY_US, ENV)
    return {**{name: os.environ[name] for name in keep if name in os.environ}, **wait_env(os.environ)}
