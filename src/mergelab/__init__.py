"""mergelab: merge fine-tuned models without retraining. See README.md and docs/api.md."""

from __future__ import annotations

from typing import Any

from mergelab import threads as _threads

_threads.before_torch()  # the mergelab command only: OpenMP reads its wait policy when torch loads it

# The subpackages `methods` and `adapt` are imported before the functions of the same names below, which
# must not be rebound to the subpackages (importing `methods` also registers every built-in method).
import mergelab.adapt as _adapt_package  # noqa: F401, E402
import mergelab.methods as _builtin_methods  # noqa: F401, E402
from mergelab.api import merge, methods, plan  # noqa: E402
from mergelab.errors import MergelabError  # noqa: E402
from mergelab.version import __version__  # noqa: E402

__all__ = ["ContinualMerger", "MergelabError", "__version__", "adapt", "merge", "methods", "plan"]


def __getattr__(name: str) -> Any:
    if name == "ContinualMerger":  # imported lazily: keeps `import mergelab` cheap
        from mergelab.continual import ContinualMerger

        return ContinualMerger
    raise AttributeError(f"module 'mergelab' has no attribute {name!r}")


def adapt(method: str, suite: Any, **options: Any) -> Any:
    """Learn a merge's coefficients on unlabelled inputs (AdaMerging, AdaMerging++, CART++) and return an
    :class:`~mergelab.adapt.run.AdaptResult`; see :func:`mergelab.adapt.run.adapt` for the options.

    Example:
        >>> result = mergelab.adapt("cart_pp", "mt8", out="merged/")   # + adapt_coefficients.json, adapt_trace.json
    """
    from mergelab.adapt.run import adapt as run_adapt

    return run_adapt(method, suite, **options)
