"""What the output records about how it was made (safetensors metadata), and the one warning that sums
up what the method noted per tensor (the spectral methods' numerical rank)."""

from __future__ import annotations

import json
import warnings
from typing import Any

from mergelab.engine.plan import MergePlan
from mergelab.version import __version__


def provenance(plan: MergePlan) -> dict[str, str]:
    """Safetensors metadata recording how the checkpoint was made. Methods that note the numerical
    rank of their matrices (``low_rank`` hyperparameter) get ``RANK_KEY`` reserved (blank), filled
    once the merge has seen every matrix (``CheckpointWriter.fill_metadata``, before the commit)."""
    inputs = [{"role": "base", "name": plan.base.label, "bytes": plan.base.nbytes}]
    inputs += [{"role": "model", "name": m.label, "bytes": m.nbytes} for m in plan.models]
    metadata = {
        "mergelab.version": __version__,
        "mergelab.method": plan.method.name,
        "mergelab.hparams": json.dumps(plan.hparams, sort_keys=True),
        "mergelab.compute_dtype": str(plan.compute_dtype).replace("torch.", ""),
        "mergelab.inputs": json.dumps(inputs),
    }
    if "low_rank" in plan.hparams:
        metadata[RANK_KEY] = " " * RANK_WIDTH
    return metadata


RANK_KEY, RANK_WIDTH = "mergelab.numerical_rank", 480  # reserved metadata value: ops.spectral.rank_report's JSON


def notes_report(plan: MergePlan, notes: dict[str, dict[str, Any]]) -> tuple[str, str] | None:
    """The warning line and metadata value summing up the method's notes (``ops.spectral.rank_report``)."""
    from mergelab.ops.spectral import rank_report

    return rank_report(plan.method.name, notes, plan.hparams)


def fitting(record: str) -> str:
    """The rank record, without its worst example if that would not fit the reservation (a long name)."""
    if len(json.dumps(record)) - 2 <= RANK_WIDTH:
        return record
    return json.dumps({k: v for k, v in json.loads(record).items() if k != "worst"}, separators=(",", ":"))


def warn_notes(report: tuple[str, str] | None) -> None:
    """One warning line summing up the method's notes, once the output is in place."""
    from mergelab.ops.spectral import LowRankWarning

    if report is not None and report[0]:
        warnings.warn(report[0], LowRankWarning, stacklevel=5)  # the caller of mergelab.merge
