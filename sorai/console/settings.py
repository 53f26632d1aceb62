"""What the console may show: the document indexes, eval runs, training runs and agent traces
the operator names on `sorai serve` (nothing else on disk is reachable through it)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sorai.errors import SoraiError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ConsoleSettings:
    """indexes: name -> index file; eval_dir, runs_dir: directories whose subdirectories are
    `sorai eval run` and `sorai train` runs; trace_dir: where agent runs write their traces
    (None: the Agents page only runs tasks when given one)."""

    indexes: dict[str, Path] = field(default_factory=dict)
    eval_dir: Path | None = None
    runs_dir: Path | None = None
    trace_dir: Path | None = None


def parse_indexes(specs: Iterable[str]) -> dict[str, Path]:
    """`--index NAME=PATH` flags as {name: path}; a bare PATH is named after its file."""
    indexes: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        name, path = name.strip(), path.strip()
        if not _NAME.match(name):
            raise SoraiError(
                f"--index name {name!r} must be letters, digits, '.', '_' or '-' (at most 64), "
                "as in --index docs=./docs.sqlite"
            )
        if name in indexes:
            raise SoraiError(f"--index name {name!r} is given twice")
        resolved = Path(path).expanduser()
        if not resolved.is_file():
            raise SoraiError(f"--index {name}={path}: no such index file (make one: sorai index)")
        indexes[name] = resolved
    return indexes


def existing_dir(flag: str, value: str | None) -> Path | None:
    """The directory a flag names, None when not given; SoraiError when it is not one."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise SoraiError(f"{flag} {value!r} is not a directory")
    return path


def child(root: Path | None, name: str, what: str) -> Path:
    """root/name when name is one of root's subdirectories (never a path out of root)."""
    if root is None:
        raise SoraiError(f"the server was started without a directory of {what}")
    if not _NAME.match(name) or not (root / name).is_dir():
        raise NotFound(f"no {what[:-1]} named {name!r} under {root.name}/")
    return root / name


class NotFound(SoraiError):
    """A run, index or trace the console was asked for that does not exist (404)."""
