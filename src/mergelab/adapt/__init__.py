"""Merging with unlabelled data: test-time adaptation of merging coefficients (AdaMerging, AdaMerging++, CART++).

``mergelab.adapt(method, suite, ...)`` (the text zoo) and ``adapt_clip(method, base, models, clip_folder,
tasks)`` (CLIP vision encoders with zero-shot heads, :mod:`.images`) learn task-wise or layer-wise coefficients
of a merge by minimising the entropy of each task's predictions on its unlabelled inputs, then write an
ordinary merged model folder with the learned coefficients (``adapt_coefficients.json``) and the
entropy/accuracy trace (``adapt_trace.json``);
``mergelab merge --method M --set coefficients=FOLDER/adapt_coefficients.json`` rebuilds the same model
without data. Modules: :mod:`mergelab.ops.adaptive` (the merged tensor as an affine function of the
coefficients) and :mod:`mergelab.ops.coefficients` (groups and the file), shared with the merge methods that
rebuild the model; here :mod:`.model` (the differentiable merged model), :mod:`.objective`
(the entropy), :mod:`.encoders` (texts or images to features), :mod:`.data` (the text tasks' inputs and heads),
:mod:`.images` (the CLIP image tasks' and ``adapt_clip``), :mod:`.optimise` (the loop), :mod:`.run` (the API).
"""

from __future__ import annotations

from typing import Any

__all__ = ["METHODS", "AdaptResult", "adapt", "adapt_clip"]

METHODS = ("adamerging", "adamerging_pp", "cart_pp")


def __getattr__(name: str) -> Any:
    if name in ("adapt", "AdaptResult"):  # lazy: the merge methods import this package's light modules
        from mergelab.adapt import run

        return getattr(run, name)
    if name == "adapt_clip":
        from mergelab.adapt import images

        return images.adapt_clip
    raise AttributeError(f"module 'mergelab.adapt' has no attribute {name!r}")
