"""Evaluation rows: JSONL or CSV with any of `query`, `context`, `response`, `ground_truth`,
the columns mappable (`--column query=question`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sorai.apps.command import read_rows
from sorai.errors import SoraiError

FIELDS = ("query", "context", "response", "ground_truth")


@dataclass
class EvalRow:
    index: int  # 0-based, in file order: what compare pairs rows by
    where: str  # file:line
    fields: dict[str, Any]  # FIELDS present in the row (mapped), values as read
    extra: dict[str, Any] = field(default_factory=dict)  # the row's other columns, kept
    error: str | None = None  # the row cannot be used (not JSON, not an object)

    def has(self, name: str) -> bool:
        value = self.fields.get(name)
        return value is not None and value != "" and value != [] and value != {}


def as_text(value: Any) -> str:
    """A field as text: a list of passages joined by blank lines, an object as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n\n".join(value)
    return json.dumps(value, ensure_ascii=False)


def parse_columns(specs: list[str] | None) -> dict[str, str]:
    """`FIELD=COLUMN` options as {field: column}."""
    mapping: dict[str, str] = {}
    for spec in specs or []:
        name, sep, column = spec.partition("=")
        name, column = name.strip(), column.strip()
        if not sep or not column:
            raise SoraiError(f"--column {spec!r}: expected FIELD=COLUMN, e.g. query=question")
        if name not in FIELDS:
            raise SoraiError(
                f"--column {spec!r}: unknown field {name!r}; fields: {', '.join(FIELDS)}"
            )
        mapping[name] = column
    return mapping


def load_rows(path: str, columns: dict[str, str] | None = None) -> list[EvalRow]:
    """The rows of a .jsonl or .csv file; a row that cannot be read comes with `error` set
    (it is reported in the results, not fatal)."""
    columns = columns or {}
    source = {name: columns.get(name, name) for name in FIELDS}
    taken = set(source.values())
    rows: list[EvalRow] = []
    for number, raw in enumerate(read_rows(path, field=None)):
        if raw.error:
            rows.append(EvalRow(number, raw.where, {}, error=raw.error))
            continue
        fields = {name: raw.row[col] for name, col in source.items() if col in raw.row}
        extra = {k: v for k, v in raw.row.items() if k not in taken}
        rows.append(EvalRow(number, raw.where, fields, extra))
    if not rows:
        raise SoraiError(f"{path}: no rows")
    return rows
