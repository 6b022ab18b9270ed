"""Continual merging: models arrive one at a time; constant memory, durable state."""

from mergelab.continual.merger import DEFAULTS, ContinualMerger

__all__ = ["DEFAULTS", "ContinualMerger"]
