"""The workspace: the one directory the agent's file tools (and the python sandbox) may touch.

Every path a tool is given is resolved (symlinks followed) and refused unless it lands inside
the workspace: `../`, absolute paths elsewhere and symlinks that point out all fail. The final
component is then opened with O_NOFOLLOW, so a symlink swapped in after the check is not
followed either; a directory above it swapped between check and open (a race a process outside
the agent would have to win) is not guarded against.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import time
import uuid
from pathlib import Path
from typing import Annotated

from pydantic import Field

from sorai import hub
from sorai.apps.agent.tools import MAX_OBSERVATION, Tool, ToolFailure, tool
from sorai.errors import SoraiError

# Characters read_file returns: under the observation's cut, so the note saying the file goes
# on reaches the model.
MAX_READ = MAX_OBSERVATION - 100
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")
MAX_LISTED = 200
MAX_OFFERED = 100  # paths offered as a schema's enum
MAX_SCANNED = 5000  # directory entries looked at to find them, per request
# A relative path of names joined by "/", none starting with a dot (no "..", no "/" first):
# what guided decoding lets a model write for a new file. Only in the schema: the tools take
# any path and say why one outside the workspace is refused.
PATH_PATTERN = r"^[\w-][\w .-]*(/[\w-][\w .-]*)*$"
# Non-empty: under guided decoding a small model otherwise "calls" with an empty path.
WorkspacePath = Annotated[
    str,
    Field(
        description="relative to the workspace",
        min_length=1,
        max_length=500,
        json_schema_extra={"pattern": PATH_PATTERN},
    ),
]


class Workspace:
    def __init__(self, root: str | os.PathLike) -> None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise SoraiError(f"workspace {path} is not a directory (create it first)")
        self.root = path.resolve()

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    def resolve(self, path: str) -> Path:
        """`path` (relative to the workspace, or absolute inside it), symlinks resolved;
        ToolFailure when it is outside."""
        if not path or "\x00" in path:
            raise ToolFailure("an empty or invalid path")
        full = Path(os.path.realpath(self.root / path))
        if full != self.root and self.root not in full.parents:
            raise ToolFailure(f"{path!r} is outside the workspace; paths are relative to it")
        return full

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() or "."

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        """The file's bytes (the first `limit` of them); ToolFailure for anything but a regular
        file (a FIFO would block the tool's thread forever, a device never end)."""
        full = self.resolve(path)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ToolFailure(f"no file {path!r} in the workspace") from None
        except IsADirectoryError:
            raise ToolFailure(f"{path!r} is a directory") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise ToolFailure(f"{path!r} is {what}")
        with os.fdopen(fd, "rb") as f:
            return f.read() if limit is None else f.read(limit)

    def write_bytes(self, path: str, data: bytes) -> Path:
        full = self.resolve(path)
        if full == self.root:
            raise ToolFailure("cannot write to the workspace directory itself")
        full.parent.mkdir(parents=True, exist_ok=True)
        full = self.resolve(path)  # the directories just made are inside: checked again
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return full


def paths_in(
    workspace: Workspace,
    directories: bool = False,
    suffixes: frozenset[str] | set[str] | None = None,
    scanned: int = MAX_SCANNED,
) -> list[str]:
    """The workspace's files (or directories, "." first) as relative paths, shallow ones first
    within each directory, at most MAX_OFFERED; hidden ones left out. The walk stops after
    `scanned` entries, as it runs for every request and a workspace may be large."""
    names: list[str] = ["."] if directories else []
    seen = 0
    for dirpath, dirnames, filenames in os.walk(workspace.root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        seen += len(dirnames) + len(filenames)
        if seen > scanned:
            return names
        found = dirnames if directories else sorted(f for f in filenames if f[:1] != ".")
        for name in found:
            if suffixes is None or Path(name).suffix.lower() in suffixes:
                names.append(workspace.relative(Path(dirpath) / name))
                if len(names) == MAX_OFFERED:
                    return names
    return names


def _offer(parameters: dict, names: list[str]) -> dict:
    """`parameters` with the path's values narrowed to `names` (the pattern goes: the enum is
    tighter); none: left open, so a call fails with "no file" rather than not at all."""
    if names:
        path = parameters["properties"]["path"]
        path.pop("pattern", None)
        path["enum"] = names
    return parameters


def fresh_workspace() -> Path:
    """A new, empty directory for one run: `$SORAI_HOME/agent/workspaces/<time>-<id>`. What a
    run writes stays there for the user to find, and nowhere else."""
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    path = hub.sorai_home() / "agent" / "workspaces" / name
    path.mkdir(parents=True)
    return path


def _is_image(data: bytes) -> bool:
    return data.startswith(_IMAGE_MAGIC)


def file_tools(workspace: Workspace) -> list[Tool]:
    """read_file, write_file and list_files, confined to `workspace`."""

    def read_file(
        path: WorkspacePath,
    ) -> str:
        """Read a text file in the workspace."""
        # Bounded: the first MAX_READ characters need at most 4 bytes each.
        data = workspace.read_bytes(path, limit=4 * MAX_READ + 4)
        size = workspace.resolve(path).stat().st_size
        if b"\x00" in data[:8192]:
            raise ToolFailure(
                f"{path!r} is a binary file ({size} bytes), not text"
                + ("; use describe_image for an image" if _is_image(data) else "")
            )
        text = data.decode("utf-8", errors="replace")
        if text.count("\ufffd") > len(text) / 10:
            raise ToolFailure(f"{path!r} is not UTF-8 text ({size} bytes)")
        if len(text) > MAX_READ or size > len(data):
            return text[:MAX_READ] + f"\n… [the file has {size} bytes; this is its beginning]"
        return text

    def write_file(
        path: WorkspacePath,
        content: str,
    ) -> str:
        """Write a text file in the workspace (replacing it), creating its directories."""
        full = workspace.write_bytes(path, content.encode("utf-8"))
        return f"wrote {len(content)} characters to {workspace.relative(full)}"

    def list_files(
        path: Annotated[
            str,
            Field(
                description="a directory in the workspace",
                max_length=500,
                json_schema_extra={"pattern": rf"^\.$|{PATH_PATTERN}"},
            ),
        ] = ".",
    ) -> str:
        """List the files in a workspace directory (recursively), with their sizes."""
        top = workspace.resolve(path)
        if not top.is_dir():
            raise ToolFailure(f"{path!r} is not a directory in the workspace")
        lines = []
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                full = Path(dirpath) / name
                if len(lines) == MAX_LISTED:
                    return "\n".join(lines + [f"… (more than {MAX_LISTED} files)"])
                size = full.lstat().st_size
                lines.append(f"{workspace.relative(full)}\t{size} bytes")
        return "\n".join(lines) or "(no files)"

    # The paths that exist are offered by name in each request: a small model picks one whole
    # (it used to drop the directory and call read_file("todo.txt") for "notes/todo.txt").
    return [
        dataclasses.replace(tool(read_file), refine=lambda p: _offer(p, paths_in(workspace))),
        tool(write_file),
        dataclasses.replace(
            tool(list_files), refine=lambda p: _offer(p, paths_in(workspace, directories=True))
        ),
    ]
