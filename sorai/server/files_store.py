"""Uploaded files: their bytes under <data dir>/files/<id>, their records in one SQLite table."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sorai.server.sqlite_db import connect

# What clients upload (OpenAI's purposes this server has a use for) and what it writes itself.
UPLOAD_PURPOSES = ("batch", "assistants", "user_data")
OUTPUT_PURPOSES = ("batch_output",)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL
)
"""


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "files"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = connect(root / "files.sqlite", _SCHEMA)

    def add(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        file_id = f"file-{uuid.uuid4().hex}"
        path = self.blobs / file_id
        # Written whole before the record exists: a listed file is always complete.
        partial = path.with_suffix(".part")
        partial.write_bytes(data)
        os.replace(partial, path)
        record = (file_id, len(data), int(time.time()), filename, purpose)
        with self._lock:
            self._db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?)", record)
        return _object(record)

    def get(self, file_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return _object(row) if row is not None else None

    def list(self, purpose: str | None = None) -> list[dict[str, Any]]:
        """Every file, newest first."""
        query = "SELECT * FROM files"
        args: tuple[str, ...] = ()
        if purpose is not None:
            query, args = query + " WHERE purpose = ?", (purpose,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at DESC, rowid DESC", args)
            return [_object(row) for row in rows.fetchall()]

    def path(self, file_id: str) -> Path:
        return self.blobs / file_id

    def content(self, file_id: str) -> bytes:
        return self.path(file_id).read_bytes()

    def delete(self, file_id: str) -> bool:
        with self._lock:
            cursor = self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self.path(file_id).unlink(missing_ok=True)
        return cursor.rowcount > 0


def _object(row: tuple[Any, ...]) -> dict[str, Any]:
    file_id, size, created_at, filename, purpose = row
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": created_at,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }
