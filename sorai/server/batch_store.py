"""Batches on disk: each batch's state in one SQLite table, and each finished line appended to
<data dir>/batches/<id>.jsonl as it finishes, so a restarted server resumes a batch without
redoing (or losing) a line."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from sorai.server.sqlite_db import connect

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    batch TEXT NOT NULL  -- the Batch object, as GET /v1/batches/{id} answers it
)
"""

# Until these, a batch is picked up again by a restarted server.
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")


class BatchStore:
    def __init__(self, root: Path) -> None:
        self.lines_dir = root / "batches"
        self.lines_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = connect(root / "batches.sqlite", _SCHEMA)

    @staticmethod
    def exists(root: Path) -> bool:
        return (root / "batches.sqlite").exists()

    def put(self, batch: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO batches VALUES (?, ?, ?)",
                (batch["id"], batch["created_at"], json.dumps(batch)),
            )

    def get(self, batch_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT batch FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return json.loads(row[0]) if row is not None else None

    def list(self) -> list[dict[str, Any]]:
        """Every batch, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT batch FROM batches ORDER BY created_at DESC, rowid DESC"
            ).fetchall()
        return [json.loads(row[0]) for row in rows]

    def unfinished(self) -> list[dict[str, Any]]:
        return [b for b in reversed(self.list()) if b["status"] in UNFINISHED]

    # -- finished lines -----------------------------------------------------------------------

    def record(self, batch_id: str, line: int, kind: str, record: dict[str, Any]) -> None:
        """Line `line` is done: `record` belongs to the output ("output") or error ("error")
        file. Flushed at once: the OS keeps it if this process is killed. Each entry starts
        on a new line of its own, so one torn by a kill never swallows the next."""
        entry = json.dumps({"line": line, "kind": kind, "record": record}, ensure_ascii=False)
        with self._lock, (self.lines_dir / f"{batch_id}.jsonl").open("a", encoding="utf-8") as f:
            f.write("\n" + entry + "\n")
            f.flush()

    def finished_lines(self, batch_id: str) -> dict[int, tuple[str, dict[str, Any]]]:
        """line -> (kind, record) of every finished line (a torn last entry is not one)."""
        path = self.lines_dir / f"{batch_id}.jsonl"
        done: dict[int, tuple[str, dict[str, Any]]] = {}
        if not path.exists():
            return done
        for text in path.read_text(encoding="utf-8").splitlines():
            if not text.strip():
                continue
            try:
                entry = json.loads(text)
            except json.JSONDecodeError:
                continue  # written half when the process died: the line runs again
            done.setdefault(entry["line"], (entry["kind"], entry["record"]))
        return done
