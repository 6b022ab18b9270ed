"""The SQLite results store: round trip of every column, status, reopening, refusal of a non-database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from mergelab.errors import MergelabError
from mergelab.experiment import Row, Store


def make_row(run_hash: str, status: str = "ok") -> Row:
    return Row(hash=run_hash, experiment="e", kind="multitask", suite="tiny", method="ties", label="ties",
               config={"hparams": {"density": 0.2}, "tasks": ["a", "b"]}, status=status,
               metrics={"accuracy": {"a": 0.5, "b": 0.75}, "average": 0.625} if status == "ok" else None,
               error=None if status == "ok" else "RuntimeError: boom", merge_seconds=1.25, eval_seconds=2.5,
               versions={"mergelab": "0.1.0", "torch": "2.13.0"}, hardware={"cpus": 2}, git_commit="abc",
               command="mergelab experiment e.yaml", created="2026-11-24T17:00:00+00:00")


def test_round_trip_and_status(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "r.sqlite"
    with Store(db) as store:
        assert store.status("h1") is None
        store.put(make_row("h1"))
        store.put(make_row("h2", "failed"))
    with Store(db, create=False) as store:  # committed: visible after reopening
        assert store.status("h1") == "ok" and store.status("h2") == "failed"
        assert store.rows(status="ok") == [make_row("h1")]
        assert store.rows() == [make_row("h1"), make_row("h2", "failed")]
        assert store.rows(experiment="other") == []
        store.put(make_row("h2"))  # a retried run replaces its failed row
        assert [r.status for r in store.rows()] == ["ok", "ok"]
    # plain SQL sees one row per run with JSON columns
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*), json_extract(metrics, '$.average') FROM runs").fetchone() == (2, 0.625)


def test_missing_or_corrupt_database_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(MergelabError, match="no such results database"):
        Store(tmp_path / "none.sqlite", create=False)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(MergelabError, match="junk.sqlite: not a results database"):
        Store(junk)
