"""What the apps' command lines share: the endpoint options and connecting through them,
batch input rows (JSONL, CSV, text) with `file:line` errors, and terminal output helpers.

`sorai.cli` imports the verbs' modules when it builds its parser, so nothing here imports a
model, a server or the openai client at import time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sorai.errors import SoraiError

TEXT_FIELD = "text"


def say(message: str) -> None:
    """A progress or status line: stderr, so stdout stays the result."""
    print(message, file=sys.stderr, flush=True)


def shown(path: str) -> str:
    """A path relative to the working directory when it is under it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def width(text: str) -> int:
    """Columns `text` takes in a terminal: East Asian wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def pad(text: str, columns: int) -> str:
    return text + " " * max(0, columns - width(text))


def short(text: str, limit: int = 60) -> str:
    """`text` on one line, cut with an ellipsis past `limit` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


# -- the endpoint ---------------------------------------------------------------------------


def add_endpoint_args(
    parser: argparse.ArgumentParser, chat: bool = True, embeddings: bool = False
) -> None:
    """--url, --api-key and, as asked, --model (chat) and --embedding-model."""
    group = parser.add_argument_group("endpoint")
    group.add_argument(
        "--url",
        default=None,
        help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default: $SORAI_URL "
        "or $OPENAI_BASE_URL, else a `sorai serve` on http://127.0.0.1:8000/v1, else sorai's "
        "own server started in this process)",
    )
    group.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="its API key (default: $SORAI_API_KEY, else $OPENAI_API_KEY)",
    )
    if chat:
        group.add_argument(
            "--model",
            default=None,
            metavar="NAME",
            help="the chat model (default: the first the endpoint lists; in this process, "
            "sorai's default model)",
        )
    if embeddings:
        group.add_argument(
            "--embedding-model",
            default=None,
            metavar="NAME",
            help="the embedding model (default: all-minilm-l6-v2, or the index's)",
        )


def api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("SORAI_API_KEY") or os.environ.get("OPENAI_API_KEY")


def connect(args: argparse.Namespace, embedding_model: str | None = None, chat: bool = True):
    """A `Client` for the endpoint the options name, else the one `Client.find` picks: its
    first stderr line says which and why. chat=False: only embeddings will be asked for."""
    from sorai.apps.client import Client

    return Client.find(
        args.url,
        args.api_key,
        getattr(args, "model", None) if chat else None,
        getattr(args, "embedding_model", None) or embedding_model,
        chat=chat,
        report=say,
    )


# -- input files ----------------------------------------------------------------------------


def read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except OSError as e:
        raise SoraiError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise SoraiError(f"{path}:{e.lineno}: not JSON: {e.msg}") from None


def read_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    """(where, value) for each non-blank line; a line that is not JSON raises SoraiError."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    where = f"{path}:{number}"
                    try:
                        yield where, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SoraiError(f"{where}: not JSON: {e.msg}") from None
    except OSError as e:
        raise SoraiError(f"cannot read {path}: {e.strerror or e}") from None


@dataclass
class Row:
    """One row of a batch input."""

    where: str  # file:line
    row: dict[str, Any]  # as read: written back out with the result
    text: str | None
    error: str | None = None


def _jsonl_rows(lines: IO[str], name: str, field: str | None) -> Iterator[Row]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield Row(where, {}, None, f"not JSON: {e.msg}")
            continue
        if not isinstance(row, dict):
            yield Row(where, {}, None, f"not a JSON object but {type(row).__name__}")
        elif field is None:
            yield Row(where, row, None)
        elif field not in row:
            yield Row(where, row, None, f"no {field!r} field (--text-field names it)")
        elif not isinstance(row[field], str) or not row[field].strip():
            yield Row(where, row, None, f"{field!r} is not a non-empty string: {row[field]!r}")
        else:
            yield Row(where, row, row[field])


class _LineCounter:
    """The lines a csv reader pulls, numbered: `start` is the first non-blank line of the
    record being read (a quoted field may span several lines; blank lines are skipped)."""

    def __init__(self, lines: IO[str]) -> None:
        self.lines = lines
        self.number = 0
        self.start: int | None = None

    def __iter__(self) -> _LineCounter:
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        self.number += 1
        if self.start is None and line.strip():
            self.start = self.number
        return line


def _csv_rows(lines: IO[str], name: str, field: str | None) -> Iterator[Row]:
    counter = _LineCounter(lines)
    reader = csv.DictReader(counter)
    columns = reader.fieldnames or []
    counter.start = None
    if field is not None and field not in columns:
        raise SoraiError(
            f"{name}:1: no {field!r} column (columns: {', '.join(columns) or 'none'}; "
            "--text-field names it)"
        )
    for row in reader:
        where = f"{name}:{counter.start}"  # where the record starts, as an editor shows it
        counter.start = None
        if None in row or None in row.values():
            yield Row(where, {}, None, f"not {len(columns)} columns as in the header")
        elif field is None:
            yield Row(where, row, None)
        elif not row[field].strip():
            yield Row(where, row, None, f"empty {field!r}")
        else:
            yield Row(where, row, row[field])


def _text_rows(lines: IO[str], name: str, field: str | None) -> Iterator[Row]:
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if text:
            yield Row(f"{name}:{number}", {field or TEXT_FIELD: text}, text)


def read_rows(path: str, field: str | None = TEXT_FIELD) -> Iterator[Row]:
    """The rows of a batch input: .csv (a header row), .txt (one text a line), else JSONL ('-':
    JSONL on stdin). `field` names the text each row must have (None: any row object will
    do). A row that cannot be used comes with `error` set."""
    if path == "-":
        yield from _jsonl_rows(sys.stdin, "<stdin>", field)
        return
    suffix = Path(path).suffix.lower()
    reader = {".csv": _csv_rows, ".txt": _text_rows}.get(suffix, _jsonl_rows)
    try:
        with open(path, encoding="utf-8-sig", newline="" if suffix == ".csv" else None) as f:
            yield from reader(f, path, field)
    except UnicodeDecodeError as e:
        raise SoraiError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    except OSError as e:
        raise SoraiError(f"cannot read {path}: {e.strerror or e}") from None
