"""The built-in tools by name, and groups of them, for `Agent(tools=[...])` and `--tools`."""

from __future__ import annotations

import os
from typing import Any

from sorai.apps.agent.tools import Tool, tool
from sorai.errors import SoraiError

FILE_TOOLS = ("read_file", "write_file", "list_files")
IMAGE_TOOLS = (
    "describe_image",
    "crop_image",
    "resize_image",
    "rotate_image",
    "grayscale",
    "blur",
    "watercolor",
    "mark_regions",
)
GROUPS = {"files": FILE_TOOLS, "images": IMAGE_TOOLS}
NAMES = ("calculator", *FILE_TOOLS, "python", *IMAGE_TOOLS, "search_documents")
DEFAULT = ("calculator", "files", "images")  # python runs code: asked for by name only
NEEDS_WORKSPACE = {*FILE_TOOLS, *IMAGE_TOOLS, "python"}


def expand(names: list[str]) -> list[str]:
    """Names with groups spelled out, in order, each once; SoraiError for an unknown one."""
    out: list[str] = []
    for name in names:
        for member in GROUPS.get(name, (name,)):
            if member not in NAMES:
                raise SoraiError(
                    f"unknown tool {member!r} (tools: {', '.join(NAMES)}; groups: "
                    f"{', '.join(GROUPS)})"
                )
            if member not in out:
                out.append(member)
    return out


def build_tools(
    items: list[Any],
    workspace: str | os.PathLike | None,
    client: Any = None,
    index: str | os.PathLike | None = None,
    python_seconds: float | None = None,
) -> list[Tool]:
    """Tools for `items`: Tool objects and functions as they are, names as built-ins."""
    names = expand([i for i in items if isinstance(i, str)])
    wanted = set(names)
    space = None
    if wanted & NEEDS_WORKSPACE:
        if workspace is None:
            needing = ", ".join(n for n in names if n in NEEDS_WORKSPACE)
            raise SoraiError(f"the tools {needing} need a workspace directory")
        from sorai.apps.agent.files import Workspace

        space = Workspace(workspace)
    built: dict[str, Tool] = {}
    if "calculator" in wanted:
        from sorai.apps.agent.calculator import calculator_tool

        built["calculator"] = calculator_tool()
    if wanted & set(FILE_TOOLS):
        from sorai.apps.agent.files import file_tools

        built.update((t.name, t) for t in file_tools(space))
    if "python" in wanted:
        from sorai.apps.agent.python_tool import DEFAULT_SECONDS, python_tool

        built["python"] = python_tool(space, python_seconds or DEFAULT_SECONDS)
    if wanted & set(IMAGE_TOOLS):
        from sorai.apps.agent.images import image_tools

        built.update((t.name, t) for t in image_tools(space))
    if "search_documents" in wanted:
        from sorai.apps.agent.documents import document_tool

        built["search_documents"] = document_tool(client, index)
    tools: list[Tool] = []
    for item in items:
        if isinstance(item, str):
            continue
        tools.append(item if isinstance(item, Tool) else tool(item))
    return [*(built[n] for n in names), *tools]
