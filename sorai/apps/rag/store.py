"""The index file: one SQLite database of documents, chunks, an FTS5 trigram index over the
chunk text, and float32 vectors searched exactly with NumPy (held in memory once loaded).

Schema (version 1):

    meta(key PRIMARY KEY, value)          schema_version, embedding_model, dimension
    documents(id, path UNIQUE, sha256, mtime, n_chunks, added_at, title, chunk_size, overlap)
    chunks(id, doc_id, ord, text, start, "end", page, heading)
    chunks_fts                            FTS5(text), external content = chunks, trigram
    vectors(chunk_id PRIMARY KEY, embedding BLOB)   float32 little-endian, L2-normalized
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sorai import hub
from sorai.apps.rag.chunk import Chunk
from sorai.errors import SearchIndexError

if TYPE_CHECKING:
    import numpy as np

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    mtime REAL NOT NULL,
    n_chunks INTEGER NOT NULL,
    added_at REAL NOT NULL,
    title TEXT,
    chunk_size INTEGER NOT NULL,
    overlap INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ord INTEGER NOT NULL,
    text TEXT NOT NULL,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    page INTEGER,
    heading TEXT
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks(doc_id, ord);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    text, content='chunks', content_rowid='id', tokenize='trigram'
);
CREATE TRIGGER IF NOT EXISTS chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
CREATE TABLE IF NOT EXISTS vectors (
    chunk_id INTEGER PRIMARY KEY REFERENCES chunks(id) ON DELETE CASCADE,
    embedding BLOB NOT NULL
);
"""


class Embedder(Protocol):
    """Where vectors come from: `sorai.apps.client.Client` or anything with these two."""

    embedding_model: str  # recorded in the index; another model is refused

    def embed(self, texts: list[str]) -> list[list[float]]: ...


def resolve_path(path: str | os.PathLike) -> Path:
    """`path` absolute, with its symbolic links resolved where they can be (a link that
    loops back on itself stays as it is named; reading it reports the loop)."""
    given = Path(path).expanduser()
    try:
        return given.resolve()
    except (RuntimeError, OSError):  # Python < 3.13 raises RuntimeError for a loop
        return Path(os.path.abspath(given))


def default_index_path() -> Path:
    """`$SORAI_HOME/index/default.sqlite` (default `~/.cache/sorai/index/default.sqlite`)."""
    return hub.sorai_home() / "index" / "default.sqlite"


@dataclass(frozen=True)
class DocumentInfo:
    """One indexed file."""

    path: str
    sha256: str
    mtime: float
    n_chunks: int
    added_at: float
    title: str | None
    chunk_size: int
    overlap: int


@dataclass(frozen=True)
class StoredChunk:
    """A chunk as read back, with its document's path."""

    id: int
    path: str
    ord: int
    text: str
    start: int
    end: int
    page: int | None
    heading: str | None


_DOCUMENT_COLUMNS = "path, sha256, mtime, n_chunks, added_at, title, chunk_size, overlap"


class Index:
    """A persistent chunk index in one SQLite file. Writes are one transaction per document;
    the vector matrix is loaded on the first vector search and reloaded after any write (this
    process's or another's)."""

    def __init__(self, path: str | os.PathLike | None = None, create: bool = True) -> None:
        self.path = Path(path).expanduser() if path is not None else default_index_path()
        if not self.path.exists():
            if not create:
                raise SearchIndexError(
                    f"no index at {self.path} (`sorai index add PATH...` creates it)"
                )
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)  # transactions explicit
        # What reads derive from the file (the vector matrix, term counts), valid while
        # `PRAGMA data_version` stays the same and this connection writes nothing.
        self._derived: dict[str, Any] = {}
        self._derived_version: int | None = None
        try:
            self._open_schema()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise SearchIndexError(f"{self.path} is not a sorai index ({e})") from None

    def _open_schema(self) -> None:
        db = self._db
        db.execute("PRAGMA foreign_keys = ON")
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if not tables:
            # Idempotent (IF NOT EXISTS, OR IGNORE): another process creating the same new
            # index at once holds the write lock; this one waits, then finds it all there.
            db.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA}; INSERT OR IGNORE INTO meta "
                f"VALUES ('schema_version', '{SCHEMA_VERSION}'); COMMIT;"
            )
            self._use_wal()
            tables = {"meta"}
        if "meta" not in tables:
            raise SearchIndexError(f"{self.path} is an SQLite file but not a sorai index")
        version = self._meta("schema_version")
        if version != str(SCHEMA_VERSION):
            raise SearchIndexError(
                f"{self.path} has index schema version {version}; this sorai reads version "
                f"{SCHEMA_VERSION}"
            )
        db.execute("PRAGMA synchronous = NORMAL")

    def _use_wal(self, wait: float = 5.0) -> None:
        """Write-ahead logging, so readers do not wait for a writer. Switching needs the file
        to itself: while another process opens the new index at once, it is retried (SQLite's
        busy timeout does not cover it)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    return  # still a working index, in rollback-journal mode
                time.sleep(0.02)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta -------------------------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @property
    def embedding_model(self) -> str | None:
        """The model whose vectors the index holds (None before the first document)."""
        return self._meta("embedding_model")

    @property
    def dimension(self) -> int | None:
        value = self._meta("dimension")
        return int(value) if value is not None else None

    def check_embedding_model(self, name: str) -> None:
        """Refuse an embedding model other than the one the index was built with (an empty
        index takes any)."""
        recorded = self.embedding_model
        if recorded is not None and recorded != name and self.chunk_count() > 0:
            raise SearchIndexError(
                f"{self.path} holds vectors of embedding model {recorded!r}, not {name!r}: "
                f"use --embedding-model {recorded}, or another --index file for {name!r}"
            )

    # -- documents --------------------------------------------------------------------------

    def document(self, path: str) -> DocumentInfo | None:
        row = self._db.execute(
            f"SELECT {_DOCUMENT_COLUMNS} FROM documents WHERE path = ?", (path,)
        ).fetchone()
        return DocumentInfo(*row) if row else None

    def documents(self) -> list[DocumentInfo]:
        rows = self._db.execute(f"SELECT {_DOCUMENT_COLUMNS} FROM documents ORDER BY path")
        return [DocumentInfo(*row) for row in rows]

    def chunk_count(self) -> int:
        cache = self._cache()
        if "chunk_count" not in cache:
            cache["chunk_count"] = self._db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        return cache["chunk_count"]

    def put_document(
        self,
        path: str,
        *,
        sha256: str,
        mtime: float,
        chunks: Sequence[Chunk],
        vectors: Sequence[Sequence[float]] | np.ndarray,
        embedding_model: str,
        title: str | None = None,
        chunk_size: int = 0,
        overlap: int = 0,
    ) -> None:
        """Add a document, or replace every chunk of the one at `path`, in one transaction."""
        import numpy as np  # here: importing the index (and the CLI) stays light

        matrix = np.asarray(vectors, dtype=np.float32)
        if matrix.ndim != 2 or len(matrix) != len(chunks):
            raise SearchIndexError(
                f"{len(chunks)} chunks need {len(chunks)} vectors, got shape {matrix.shape}"
            )
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        matrix = (matrix / np.where(norms > 0, norms, 1)).astype("<f4")
        with self._write() as db:
            self._check_vectors(embedding_model, matrix.shape[1])
            self._delete_where("path = ?", (path,))
            cursor = db.execute(
                f"INSERT INTO documents ({_DOCUMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (path, sha256, mtime, len(chunks), time.time(), title, chunk_size, overlap),
            )
            doc_id = cursor.lastrowid
            for chunk, vector in zip(chunks, matrix, strict=True):
                cursor = db.execute(
                    'INSERT INTO chunks (doc_id, ord, text, start, "end", page, heading) '
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (doc_id, chunk.ord, chunk.text, chunk.start, chunk.end, chunk.page,
                     chunk.heading),
                )  # fmt: skip
                db.execute(
                    "INSERT INTO vectors (chunk_id, embedding) VALUES (?, ?)",
                    (cursor.lastrowid, vector.tobytes()),
                )

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed whole or rolled back whole; the derived caches
        (the vector matrix) are dropped either way."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            self._derived.clear()

    def _check_vectors(self, model: str, dimension: int) -> None:
        """Inside a write: the first vectors (or the first after the index was emptied)
        record the model and dimension; later ones must match them."""
        if self._db.execute("SELECT 1 FROM chunks LIMIT 1").fetchone() is None:
            self._db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [("embedding_model", model), ("dimension", str(dimension))],
            )
            return
        self.check_embedding_model(model)
        if dimension != self.dimension:
            raise SearchIndexError(
                f"vectors of {dimension} dimensions for an index of {self.dimension}"
            )

    def _delete_where(self, condition: str, params: tuple) -> list[str]:
        ids = self._db.execute(f"SELECT id, path FROM documents WHERE {condition}", params)
        rows = ids.fetchall()
        for doc_id, _ in rows:
            chunk_ids = "SELECT id FROM chunks WHERE doc_id = ?"
            self._db.execute(f"DELETE FROM vectors WHERE chunk_id IN ({chunk_ids})", (doc_id,))
            self._db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
            self._db.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
        return [path for _, path in rows]

    def remove(self, path: str | os.PathLike) -> list[str]:
        """Remove the document at `path`, or every document under the directory `path`
        (which need not exist any more); the paths removed."""
        given = Path(path).expanduser()
        # As indexed: a directory named resolved, a symbolic link found inside one as it is.
        targets = dict.fromkeys([str(resolve_path(given)), os.path.abspath(given)])
        condition = " OR ".join(["path = ? OR substr(path, 1, ?) = ?"] * len(targets))
        params: list[object] = []
        for target in targets:
            prefix = target.rstrip(os.sep) + os.sep
            params += [target, len(prefix), prefix]
        with self._write():
            return self._delete_where(condition, tuple(params))

    # -- reads for search -------------------------------------------------------------------

    def chunks(self, ids: Sequence[int]) -> dict[int, StoredChunk]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._db.execute(
            'SELECT c.id, d.path, c.ord, c.text, c.start, c."end", c.page, c.heading '
            f"FROM chunks c JOIN documents d ON d.id = c.doc_id WHERE c.id IN ({marks})",
            list(ids),
        )
        return {row[0]: StoredChunk(*row) for row in rows}

    def _cache(self) -> dict[str, Any]:
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._derived_version:
            self._derived.clear()
            self._derived_version = version
        return self._derived

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids, their [n, dim] float32 normalized vectors): what vector search scans,
        loaded once and cached until the file changes."""
        import numpy as np

        cache = self._cache()
        if "vectors" not in cache:
            rows = self._db.execute("SELECT chunk_id, embedding FROM vectors ORDER BY chunk_id")
            ids, blobs = [], []
            for chunk_id, blob in rows:
                ids.append(chunk_id)
                blobs.append(blob)
            dimension = self.dimension or 0
            matrix = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(ids), dimension)
            cache["vectors"] = (np.asarray(ids, dtype=np.int64), matrix)
        return cache["vectors"]

    def trigram_counts(self, trigrams: Sequence[str]) -> dict[str, int]:
        """How many chunks contain each 3-character string (as the trigram index folds case);
        cached until the file changes."""
        cache = self._cache()
        if "trigrams" not in cache:
            cache["trigrams"] = {}
            self._db.execute(
                "CREATE VIRTUAL TABLE IF NOT EXISTS temp.chunks_vocab "
                "USING fts5vocab(main, 'chunks_fts', 'row')"
            )
        counts: dict[str, int] = cache["trigrams"]
        for trigram in trigrams:
            key = trigram.lower()
            if key not in counts:
                row = self._db.execute(
                    "SELECT doc FROM temp.chunks_vocab WHERE term = ?", (key,)
                ).fetchone()
                counts[key] = row[0] if row else 0
        return {trigram: counts[trigram.lower()] for trigram in trigrams}

    def nearest(self, vector: Sequence[float] | np.ndarray, k: int) -> list[tuple[int, float]]:
        """The k chunks most similar to `vector` (cosine, exact), best first."""
        import numpy as np

        ids, matrix = self.vectors()
        if len(ids) == 0 or k <= 0:
            return []
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        if query.shape[0] != matrix.shape[1]:
            raise SearchIndexError(
                f"a query vector of {query.shape[0]} dimensions for an index of {matrix.shape[1]}"
            )
        norm = float(np.linalg.norm(query))
        # einsum, not `matrix @ query`: BLAS would run this one matrix-vector product on all
        # cores, and on a busy machine (a server decoding on every core) waiting for the
        # other threads costs milliseconds; one core does 10k x 384 in ~1 ms, every time.
        scores = np.einsum("ij,j->i", matrix, query / norm if norm > 0 else query)
        k = min(k, len(ids))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(ids) else np.arange(len(ids))
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(ids[i]), float(scores[i])) for i in top]

    def match(self, expression: str, k: int) -> list[tuple[int, float]]:
        """Chunks matching an FTS5 query expression, best BM25 first, with -bm25 (higher is
        better). The expression must be well formed (see search.keyword_query)."""
        rows = self._db.execute(
            "SELECT rowid, bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? "
            "ORDER BY bm25(chunks_fts) LIMIT ?",
            (expression, k),
        )
        return [(chunk_id, -score) for chunk_id, score in rows]

    def containing(self, terms: Sequence[str]) -> Iterator[tuple[int, str]]:
        """(id, text) of every chunk that contains any of `terms` (a scan, case-insensitive
        for ASCII): for terms too short for the trigram index."""
        if not terms:
            return iter(())
        escaped = [t.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") for t in terms]
        where = " OR ".join(["text LIKE ? ESCAPE '\\'"] * len(terms))
        return iter(
            self._db.execute(
                f"SELECT id, text FROM chunks WHERE {where}", [f"%{e}%" for e in escaped]
            )
        )
