"""The library's entry points: :func:`merge`, :func:`plan` and :func:`methods`, re-exported by the package
root as ``mergelab.merge``, ``mergelab.plan`` and ``mergelab.methods``. The packages above the engine
(``adapt``, ``experiment``, ``search``) call these, never the engine's internals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def plan(
    method: str,
    base: Any,
    models: list[Any],
    *,
    out: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    max_shard_size: int = 5 * 10**9,
    **hparams: Any,
) -> Any:
    """Validate a merge from headers alone and return its :class:`~mergelab.engine.plan.MergePlan`.

    Reads no tensor data. ``print(plan(...).summary())`` shows tensors, passes, peak memory and
    output shards. Raises :class:`MergelabError` on any problem that can be known up front, a
    ``device`` this machine does not have included.
    """
    from mergelab import threads
    from mergelab.engine.plan import build_plan

    threads.ensure()
    return build_plan(
        method, base, list(models), hparams, out=out, overwrite=overwrite, device=device,
        dtype=dtype, max_shard_size=max_shard_size,
    )


def merge(
    method: str,
    base: Any,
    models: list[Any],
    *,
    out: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    max_shard_size: int = 5 * 10**9,
    progress: bool | None = None,
    **hparams: Any,
) -> dict[str, torch.Tensor] | Path:
    """Merge ``models`` into ``base`` with a registered method.

    Args:
        method: a name from :func:`methods`, e.g. ``"ties"``.
        base: the pre-trained model (any model-like input: path, state dict, module).
        models: the fine-tuned models, same tensor names and shapes as ``base``.
        out: if given, write a safetensors checkpoint there (a folder, sharded above
            ``max_shard_size`` bytes, or a ``.safetensors`` file) and return its path.
        device: ``"cpu"`` (default) or ``"cuda"`` for the per-tensor computation.
        dtype: compute dtype, ``"float32"`` (default) or ``"float64"``.
        overwrite: replace an existing ``out`` atomically.
            A killed earlier run towards ``out`` is tidied first: its temporary folders removed, a
            replace it left half done finished (see :func:`mergelab.io.leftovers.sweep`).
        progress: show a progress bar (default: when stderr is a terminal).
        **hparams: the method's hyperparameters (``mergelab methods`` lists them).

    Returns:
        The merged state dict on CPU (same keys and dtypes as ``base``), or the output path.

    Example:
        >>> merged = mergelab.merge("ties", base="base/", models=["a/", "b/"], density=0.2)
    """
    from mergelab import threads
    from mergelab.engine.plan import build_plan
    from mergelab.engine.stream import execute
    from mergelab.io.leftovers import sweep

    threads.ensure()
    if out is not None:
        sweep(Path(out))  # a killed earlier run's leftovers first: an output it put back counts as existing
    job = build_plan(
        method, base, list(models), hparams, out=out, overwrite=overwrite, device=device,
        dtype=dtype, max_shard_size=max_shard_size,
    )
    try:
        return execute(job, progress=progress)
    finally:
        job.close()


def methods() -> list[str]:
    """Names of every registered merging method."""
    from mergelab.methods.registry import all_methods

    return list(all_methods())
