"""Tools the server runs itself inside a response (OpenAI's built-in tools: file_search,
code_interpreter). The server only keeps a registry: what runs them needs the apps (the
document index, the python sandbox), so a package above both fills it (sorai/hosted_tools,
added to the app the way the console is)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI


@dataclass
class HostedContext:
    """Where a call runs: the app, the conversation (its first response's id; a workspace is
    kept per conversation), the user's latest message (file_search searches for it too:
    a small model's own query can be poor) and the id its output item gets (streamed events
    name the item before it has run)."""

    app: FastAPI
    conversation: str
    question: str
    item_id: str = ""


@dataclass
class HostedCall:
    """One run of a hosted tool: the output item the response lists (a file_search_call, a
    code_interpreter_call) and annotations for the message that follows (file citations).
    What the model reads as the call's result is the tool's replay(item), now and whenever
    a later turn replays the conversation."""

    item: dict[str, Any]
    annotations: list[dict[str, Any]] = field(default_factory=list)


class HostedTool(Protocol):
    kind: str  # the tool's type in a request ("file_search"); its items' type is kind_call
    phase: str  # the streamed event while it works (response.file_search_call.searching)

    def pending(self, item_id: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """The call's output item before it has run (status in_progress)."""

    def replay(self, item: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """(the call's arguments, the result text the model reads) of one of its output
        items; raises KeyError, TypeError or ValueError for an item it cannot read."""

    def check(self, spec: dict[str, Any], app: FastAPI) -> None:
        """Raise an APIError for a spec this tool cannot serve (an unknown vector store)."""

    def function(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The function the model calls it as: {"name", "description", "parameters"}."""

    async def run(
        self, spec: dict[str, Any], arguments: dict[str, Any], context: HostedContext
    ) -> HostedCall:
        """Run one call."""


def register(app: FastAPI, tool: HostedTool) -> None:
    hosted_tools(app)[tool.kind] = tool


def hosted_tools(app: FastAPI) -> dict[str, HostedTool]:
    tools = getattr(app.state, "hosted_tools", None)
    if tools is None:
        tools = app.state.hosted_tools = {}
    return tools
