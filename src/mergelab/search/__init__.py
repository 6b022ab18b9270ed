"""Tuning merges against data: ``mergelab search`` / :func:`search`.

A search tunes a method's hyperparameters (grid, or optuna's TPE) on the validation split of a zoo suite
(docs/data.md §3), stores every trial in the experiment store (resumable), reports the chosen candidate's
test accuracy apart from its validation score, and writes the best configuration as a job YAML.
Modules: :mod:`~mergelab.search.space` (search spaces), :mod:`~mergelab.search.strategy` (proposals),
:mod:`~mergelab.search.candidates` (in-memory merges, linear fast path), :mod:`~mergelab.search.validation`
(the validation split and scorer), :mod:`~mergelab.search.runner` (the loop).
"""

from mergelab.search.runner import search
from mergelab.search.space import Dim, parse_dim, parse_space
from mergelab.search.trials import SearchResult, SearchSpec, Trial, best_trial

__all__ = ["Dim", "SearchResult", "SearchSpec", "Trial", "best_trial", "parse_dim", "parse_space", "search"]
