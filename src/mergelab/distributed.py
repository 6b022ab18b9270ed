"""Running independent jobs (experiment runs, search trials) as Ray tasks; the caller alone writes results.

``--ray local`` starts a Ray instance on this machine (``local:N``: with N CPUs); any other value is the
address of a running cluster (``ray start --head`` prints it; ``auto`` finds the one this machine joined).
Each job is one task taking an equal share of the cluster's CPUs (``mergelab.threads``: at least one, at most a
node's), and computing on that many threads. A task whose worker dies is retried (``MAX_RETRIES`` times), then
reported as an error, so that the caller records it as failed and a rerun fills it in. Workers read models
through paths the driver gives them (a cache folder shared by every node, README "Ray") and check each
file's sha256 against the driver's first (:func:`check_fingerprints`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mergelab import threads
from mergelab.errors import MergelabError

MAX_RETRIES = 2


def ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise MergelabError("--ray needs Ray: pip install 'mergelab[distributed]'") from None
    return ray


def check_address(address: str) -> None:
    """``local``, ``local:N`` (N >= 1) or a cluster address; raises MergelabError before anything runs."""
    if not isinstance(address, str) or not address.strip():
        raise MergelabError("--ray: give local, local:N or a cluster address")
    if address.startswith("local:") and not (address[6:].isdigit() and int(address[6:]) >= 1):
        raise MergelabError(f"--ray {address}: local:N needs a positive number of CPUs")


def connect(address: str) -> bool:
    """Start (``local``, ``local:N``) or join (an address) a Ray cluster; True when this call started it.

    A Ray already initialised in this process is used as it is (and not shut down by :func:`disconnect`).
    """
    check_address(address)
    ray = ray_module()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False}
    if address == "local" or address.startswith("local:"):
        count = address.partition(":")[2]
        kwargs["num_cpus"] = int(count) if count else threads.budget() or os.cpu_count() or 1
        # workers on this machine import what the driver imports (a checkout on PYTHONPATH, test helpers)
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
                                              **threads.worker_env()}}
    else:
        kwargs["address"] = address
        if threads.worker_env():  # OpenMP's waiting is read when a worker loads torch
            kwargs["runtime_env"] = {"env_vars": threads.worker_env()}
    try:
        ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise MergelabError(f"--ray {address}: cannot start or reach the cluster ({' '.join(str(err).split())})") from None
    return True


def disconnect(started: bool) -> None:
    if started:
        ray_module().shutdown()


def run_tasks(fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], *,
              max_retries: int | None = None) -> Iterator[tuple[int, Any, BaseException | None]]:
    """Run ``fn(*job)`` for every job as a Ray task; yield ``(index, result, None)`` or ``(index, None, error)``
    as each finishes (the error when the task's worker died more often than retried). An interrupt cancels
    the tasks still pending and propagates."""
    ray = ray_module()
    cpus = threads.ray_task_cpus(len(jobs), ray)  # the cluster's CPUs divided among the tasks running at once
    remote = ray.remote(num_cpus=cpus, max_retries=MAX_RETRIES if max_retries is None else max_retries)(fn)
    pending = {remote.remote(*job): i for i, job in enumerate(jobs)}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                try:
                    yield index, ray.get(ref), None
                except ray.exceptions.RayError as err:
                    yield index, None, err
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def fingerprint(path: str | Path) -> str:
    """sha256 of a model file, or of a folder's weight files (*.safetensors, else *.bin), joined."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    else:
        files = [path]
    if not files or not all(f.is_file() for f in files):
        raise MergelabError("no model weights here (the cache folder must be shared by every node)", file=str(path))
    from mergelab.zoo.backbones import files_sha256

    return files_sha256(files)


def fingerprints(paths: Sequence[Any]) -> dict[str, str]:
    """``{path: sha256}`` of every path-like model (state dicts and modules are shipped by value: not listed)."""
    return {str(p): fingerprint(p) for p in paths if isinstance(p, (str, Path))}


def check_fingerprints(expected: dict[str, str]) -> None:
    """On a worker: every model file is there and is the driver's (same sha256); raises MergelabError."""
    for path, digest in expected.items():
        found = fingerprint(path)
        if found != digest:
            raise MergelabError(f"differs from the driver's copy (sha256 {found[:12]} != {digest[:12]}): "
                                f"every node must see the same cache folder", file=path)
