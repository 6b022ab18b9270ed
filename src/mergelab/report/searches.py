"""The Markdown section ``mergelab report`` writes for a search stored in a results database."""

from __future__ import annotations

from typing import Any

from mergelab.report.tables import md_table


def search_lines(rows: list[Any]) -> list[str]:
    """A search's trials (validation scores), then the chosen candidate's test accuracy, reported apart."""
    trials = sorted((r for r in rows if r.kind == "search"), key=lambda r: int(r.config["trial"]))
    table = [[str(r.config["trial"]), " ".join(f"{k}={v}" for k, v in r.config["params"].items()),
              f"{r.metrics['score']:.4f}" if r.metrics else "failed"] for r in trials]
    lines = [md_table(["trial", "hyperparameters", "validation score"], table), ""]
    for row in rows:
        if row.kind == "search_test" and row.metrics:
            lines += [f"Chosen: {row.label}; test accuracy {row.metrics['average']:.4f} (not used to choose).", ""]
    return lines
