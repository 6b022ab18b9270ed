"""mergelab: merge fine-tuned models without retraining. See README.md and docs/api.md."""

from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path
from typing import Any

from mergelab import threads as _threads

_threads.before_torch()  # the mergelab command only: OpenMP reads its wait policy when torch loads it
import torch  # noqa: E402

import mergelab.methods as _builtin_methods  # noqa: F401, E402  (registers the methods; imported before the
from mergelab.errors import MergelabError  # noqa: E402  function `methods` below, which must not be rebound to the subpackage)

__all__ = ["ContinualMerger", "MergelabError", "__version__", "adapt", "merge", "methods", "plan"]


def __getattr__(name: str) -> Any:
    if name == "ContinualMerger":  # imported lazily: keeps `import mergelab` cheap
        from mergelab.continual import ContinualMerger

        return ContinualMerger
    raise AttributeError(f"module 'mergelab' has no attribute {name!r}")


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
    from mergelab.engine.plan import build_plan

    _threads.ensure()
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
    from mergelab.engine.plan import build_plan
    from mergelab.engine.stream import execute
    from mergelab.io.leftovers import sweep

    _threads.ensure()
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


def adapt(method: str, suite: Any, **options: Any) -> Any:
    """Learn a merge's coefficients on unlabelled inputs (AdaMerging, AdaMerging++, CART++) and return an
    :class:`~mergelab.adapt.run.AdaptResult`; see :func:`mergelab.adapt.run.adapt` for the options.

    Example:
        >>> result = mergelab.adapt("cart_pp", "mt8", out="merged/")   # + adapt_coefficients.json, adapt_trace.json
    """
    from mergelab.adapt.run import adapt as run_adapt

    return run_adapt(method, suite, **options)
