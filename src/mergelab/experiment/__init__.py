"""Experiments: a grid of methods x hyperparameters x task subsets x zoo suites, merged, scored, and stored
one row per run in an SQLite database, so that interrupted experiments resume and finished runs are reused.

``mergelab experiment CONFIG.yaml`` / :func:`run`; configs: :mod:`mergelab.experiment.config`; the store:
:mod:`mergelab.experiment.store`; ACC / BWT: :mod:`mergelab.experiment.metrics`; reports: :mod:`mergelab.report`.
"""

from mergelab.experiment.config import ExperimentConfig, RunSpec, load_config, parse_config
from mergelab.experiment.runner import Summary, run
from mergelab.experiment.single import CachedEvaluator
from mergelab.experiment.store import Row, Store

__all__ = ["CachedEvaluator", "ExperimentConfig", "Row", "RunSpec", "Store", "Summary", "load_config",
           "parse_config", "run"]
