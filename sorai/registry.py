"""The cache's record of what `sorai pull` and `sorai train` put there: one JSON file under
$SORAI_HOME, rewritten atomically under a lock, read by name resolution and `sorai ls/show/rm`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from sorai.errors import HubError

MODEL = "model"
ADAPTER = "adapter"

# Version of the file's layout; an unknown one is refused rather than misread.
FORMAT_VERSION = 1


@dataclass
class Entry:
    """One registered model or adapter; `name` is what users type (`org/repo`, a run's name)."""

    name: str
    kind: str  # MODEL or ADAPTER
    format: str  # "safetensors", "gguf" or "peft"
    path: str  # the model directory or file, absolute
    source: str  # "hf:org/repo@<commit>" or "train:<run directory>"
    size: int = 0  # bytes on disk
    base: str | None = None  # an adapter's (or a fine-tuned model's) base model
    run: str | None = None  # the training run directory it came from
    revision: str | None = None  # the Hub commit it was pulled at
    ref: str | None = None  # the revision as asked for (a branch or tag), None: the default
    files: dict[str, str] = field(default_factory=dict)  # file -> "sha256:..." / "git-sha1:..."
    owned: bool = True  # whether its files live in the cache (rm deletes them) or elsewhere
    created: float = 0.0

    @classmethod
    def from_dict(cls, raw: dict) -> Entry:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def registry_path(home: Path) -> Path:
    """`$SORAI_REGISTRY` when set (the test suite keeps its registrations apart from the
    user's that way), else `registry.json` in the cache root."""
    override = os.environ.get("SORAI_REGISTRY")
    return Path(override) if override else home / "registry.json"


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Held across a read-modify-write, so two pulls finishing together both get recorded."""
    path = registry_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(".registry.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load(home: Path) -> dict[str, Entry]:
    """Every registered entry by name; an absent file is an empty registry."""
    path = registry_path(home)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise HubError(f"{path} cannot be read ({e}); move it aside to start a new one") from None
    if raw.get("version") != FORMAT_VERSION:
        raise HubError(
            f"{path} has format version {raw.get('version')!r}; this sorai reads "
            f"version {FORMAT_VERSION}"
        )
    return {name: Entry.from_dict(entry) for name, entry in raw.get("entries", {}).items()}


def _save(home: Path, entries: dict[str, Entry]) -> None:
    path = registry_path(home)
    body = {
        "version": FORMAT_VERSION,
        "entries": {n: asdict(e) for n, e in sorted(entries.items())},
    }
    # Written beside the file and renamed over it: a reader sees the old or the new registry,
    # never half of one, whatever happens mid-write.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".registry-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def get(home: Path, name: str) -> Entry | None:
    return load(home).get(name)


def put(home: Path, entry: Entry) -> Entry | None:
    """Record `entry` under its name; returns the entry it replaced, if any."""
    if not entry.created:
        entry.created = time.time()
    with _locked(home):
        entries = load(home)
        previous = entries.get(entry.name)
        entries[entry.name] = entry
        _save(home, entries)
    return previous


def remove(home: Path, name: str) -> Entry | None:
    """Forget `name`; returns its entry (None when it was not registered)."""
    with _locked(home):
        entries = load(home)
        entry = entries.pop(name, None)
        if entry is not None:
            _save(home, entries)
    return entry


def disk_size(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
