"""Stored responses: a small SQLite file under the server's data directory, so that
previous_response_id and GET /v1/responses/{id} survive a restart."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sorai.server.sqlite_db import connect

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    response TEXT NOT NULL,     -- the Response object, as answered
    input_items TEXT NOT NULL,  -- this request's input items, with their ids
    history TEXT NOT NULL       -- the conversation so far as chat messages, answer included
)
"""


@dataclass
class StoredResponse:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    history: list[dict[str, Any]]


class ResponseStore:
    """Responses by id. Calls are short and serialized by a lock (the server's handlers and
    batch workers share one connection)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = connect(path, _SCHEMA)

    def put(self, stored: StoredResponse) -> None:
        response = stored.response
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                (
                    response["id"],
                    response["created_at"],
                    json.dumps(response),
                    json.dumps(stored.input_items),
                    json.dumps(stored.history),
                ),
            )

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute(
                "SELECT response, input_items, history FROM responses WHERE id = ?",
                (response_id,),
            ).fetchone()
        if row is None:
            return None
        return StoredResponse(*(json.loads(column) for column in row))

    def delete(self, response_id: str) -> bool:
        with self._lock:
            cursor = self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
        return cursor.rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
