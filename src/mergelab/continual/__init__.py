"""Continual merging: models arrive one at a time; constant memory, durable state. The rules are registered
in :mod:`mergelab.continual.rules`, one module each."""

from mergelab.continual.merger import ContinualMerger
from mergelab.continual.rules import all_rules

DEFAULTS = {name: dict(rule.defaults) for name, rule in all_rules().items()}  # every rule's defaults

__all__ = ["DEFAULTS", "ContinualMerger"]
