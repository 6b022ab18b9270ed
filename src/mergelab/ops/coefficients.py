"""Coefficient groups and the coefficients file (what ``mergelab adapt`` learns, what ``mergelab merge`` rebuilds from).

Granularity (hyperparameter ``granularity`` of adamerging, adamerging_pp and cart_pp):

* ``"layer"`` (default): layer-wise AdaMerging as the official code runs it -- one coefficient per task per
  parameter tensor (EnnengYang/AdaMerging ``src/main_layer_wise_adamerging.py``: ``lambdas_raw`` has one row per
  entry of the state dict; FusionBench ``get_layer_wise_weights(num_layers=len(parameters))``);
* ``"block"``: one per task per transformer block (names with ``layer.N.`` / ``layers.N.`` / ``h.N.`` /
  ``blocks.N.`` / ``resblocks.N.``), the embeddings (names containing ``embed``) one group, every other tensor
  one group -- fewer coefficients, the grouping the paper's "layer" suggests for a transformer;
* ``"task"``: task-wise AdaMerging, one coefficient per task (official ``main_task_wise_adamerging.py``).

The file is JSON: ``{"format": 1, "method", "hparams", "tasks", "coefficients": {group: [c_1, ..., c_T]},
"trace", ...}``; the coefficients are the values the merged model uses (after clamping), float32 values
written exactly (a float32 is a float64 is a JSON number, round trip exact).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError

GRANULARITIES = ("layer", "block", "task")
FORMAT = 1
FILE = "adapt_coefficients.json"  # in an adapted model's folder
TRACE = "adapt_trace.json"

_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks?|resblocks)\.(\d+)\.")


def group_of(name: str, granularity: str) -> str:
    """The coefficient group of tensor ``name``."""
    if granularity == "task":
        return "all"
    if granularity == "layer":
        return name
    match = _BLOCK.search(name)
    if match:
        return name[: match.end() - 1]  # e.g. "encoder.layer.3"
    return "embeddings" if "embed" in name else "other"


def groups_of(names: list[str], granularity: str) -> list[str]:
    """The distinct groups of ``names``, in order of first appearance."""
    return list(dict.fromkeys(group_of(n, granularity) for n in names))


def load(coefficients: Any) -> dict[str, Any]:
    """A coefficients file (path) or its content (mapping), checked; one-line MergelabError otherwise."""
    if isinstance(coefficients, Mapping):
        return _checked(dict(coefficients), "coefficients")
    if not isinstance(coefficients, (str, os.PathLike)):
        raise MergelabError(f"coefficients must be a file path or a mapping, got {type(coefficients).__name__}")
    path = Path(coefficients).expanduser()
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        raise MergelabError("no such coefficients file (made by `mergelab adapt`)", file=str(path)) from None
    return _read(str(path), stamp)


@functools.lru_cache(maxsize=8)
def _read(path: str, stamp: int) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MergelabError(f"cannot read the coefficients ({err})", file=path) from None
    return _checked(data, path)


def _checked(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MergelabError(f"not a mergelab coefficients file (format {FORMAT})", file=where)
    for key in ("method", "hparams", "tasks", "coefficients"):
        if key not in data:
            raise MergelabError(f"coefficients file lacks {key!r}", file=where)
    tasks, table = data["tasks"], data["coefficients"]
    if not isinstance(tasks, list) or not tasks or not isinstance(table, dict) or not isinstance(data["hparams"], dict):
        raise MergelabError("coefficients file: malformed tasks, hparams or coefficients", file=where)
    for group, row in table.items():
        if (not isinstance(row, list) or len(row) != len(tasks)
                or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in row)):
            raise MergelabError(f"coefficients of group {group!r}: need {len(tasks)} finite numbers", file=where)
    return data


def row(table: Mapping[str, Any] | None, name: str, granularity: str, n_tasks: int, init: float) -> list[float]:
    """The coefficients of tensor ``name``: its group's row of ``table``, or ``init`` for every task without one."""
    if table is None:
        return [init] * n_tasks
    group = group_of(name, granularity)
    if group not in table["coefficients"]:
        raise MergelabError(f"the coefficients file has no group {group!r} (learned for another model?)", tensor=name)
    values = table["coefficients"][group]
    if len(values) != n_tasks:
        raise MergelabError(f"coefficients for {len(values)} tasks, merging {n_tasks} models")
    return [float(v) for v in values]


def fill_from_file(hp: dict[str, Any], method: str, learned: tuple[str, ...]) -> dict[str, Any]:
    """With a coefficients file, the hyperparameters its coefficients were learned with (``learned``) are used."""
    if hp.get("coefficients") is None:
        return hp
    data = load(hp["coefficients"])
    if data["method"] != method:
        raise MergelabError(f"the coefficients were learned by {data['method']!r}, not {method!r}")
    return {**hp, **{k: data["hparams"][k] for k in learned if k in data["hparams"]}}


def check_file(hp: dict[str, Any], method: str, n_models: int) -> None:
    """``check`` part shared by the three methods: the file's method and task count."""
    if hp["granularity"] not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}")
    if hp.get("coefficients") is None:
        return
    data = load(hp["coefficients"])
    if data["method"] != method:
        raise ValueError(f"the coefficients were learned by {data['method']!r}, not {method!r}")
    if len(data["tasks"]) != n_models:
        raise ValueError(f"the coefficients are for {len(data['tasks'])} models ({', '.join(data['tasks'])}), "
                         f"got {n_models}")
