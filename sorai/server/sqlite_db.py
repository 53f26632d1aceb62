"""The SQLite connection the server's small stores (files, batches, responses) each keep."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def connect(path: Path, schema: str) -> sqlite3.Connection:
    """`path` opened with `schema` applied: one connection shared by the server's threads (each
    store serializes its calls with a lock of its own), autocommit, write-ahead log."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(schema)
    return db
