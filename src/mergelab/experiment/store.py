"""The results store: one SQLite file (stdlib ``sqlite3``), one row per run, keyed by the run's config hash.

A row is written (and committed) only when its run has finished, successfully or with an error, so a
run interrupted half-way leaves no row and is simply run again; finished runs are reused, never
recomputed. JSON columns hold the canonical config, the metrics and the provenance.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    hash TEXT PRIMARY KEY,        -- sha256 (16 hex) of the run's canonical config key
    experiment TEXT NOT NULL,
    kind TEXT NOT NULL,
    suite TEXT NOT NULL,
    method TEXT NOT NULL,
    label TEXT NOT NULL,
    config TEXT NOT NULL,         -- canonical JSON (RunSpec.to_json)
    status TEXT NOT NULL,         -- 'ok' or 'failed'
    metrics TEXT,                 -- JSON
    error TEXT,
    merge_seconds REAL,
    eval_seconds REAL,
    versions TEXT,                -- JSON: mergelab, torch, python, ...
    hardware TEXT,                -- JSON
    git_commit TEXT,
    command TEXT,
    created TEXT NOT NULL         -- UTC ISO 8601
);
"""
COLUMNS = ("hash", "experiment", "kind", "suite", "method", "label", "config", "status", "metrics", "error",
           "merge_seconds", "eval_seconds", "versions", "hardware", "git_commit", "command", "created")
JSON_COLUMNS = ("config", "metrics", "versions", "hardware")


@dataclass
class Row:
    hash: str
    experiment: str
    kind: str
    suite: str
    method: str
    label: str
    config: dict[str, Any]
    status: str
    metrics: dict[str, Any] | None
    error: str | None
    merge_seconds: float | None
    eval_seconds: float | None
    versions: dict[str, Any]
    hardware: dict[str, Any]
    git_commit: str | None
    command: str | None
    created: str


class Store:
    """Open (or create) the results database at ``path``."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise MergelabError("no such results database", file=str(self.path))
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path)
            self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise MergelabError(f"not a results database ({err})", file=str(self.path)) from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self, run_hash: str) -> str | None:
        """``'ok'``, ``'failed'`` or ``None`` (never run, or interrupted)."""
        cur = self.conn.execute("SELECT status FROM runs WHERE hash = ?", (run_hash,))
        found = cur.fetchone()
        return None if found is None else str(found[0])

    def put(self, row: Row) -> None:
        """Insert or replace ``row`` and commit at once (a later crash cannot lose it)."""
        values = [json.dumps(getattr(row, c), sort_keys=True) if c in JSON_COLUMNS else getattr(row, c)
                  for c in COLUMNS]
        self.conn.execute(f"INSERT OR REPLACE INTO runs ({', '.join(COLUMNS)}) "
                          f"VALUES ({', '.join('?' * len(COLUMNS))})", values)
        self.conn.commit()

    def rows(self, *, status: str | None = None, experiment: str | None = None) -> list[Row]:
        """Rows in insertion order, optionally only one status / experiment."""
        query, args = f"SELECT {', '.join(COLUMNS)} FROM runs WHERE 1=1", list[str]()
        if status is not None:
            query, args = query + " AND status = ?", [*args, status]
        if experiment is not None:
            query, args = query + " AND experiment = ?", [*args, experiment]
        out = []
        for values in self.conn.execute(query + " ORDER BY rowid", args):
            data = {c: (json.loads(v) if c in JSON_COLUMNS and v is not None else v)
                    for c, v in zip(COLUMNS, values, strict=True)}
            out.append(Row(**data))
        return out
