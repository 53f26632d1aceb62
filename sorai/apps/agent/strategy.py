"""What both strategies hand the agent's loop: a decision per model turn."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from sorai.apps.agent.tools import Toolbox, ToolResult


@dataclass
class Call:
    name: str
    arguments: Any  # parsed JSON, or the text as written when it was not JSON
    id: str = ""

    def key(self) -> str:
        """Identity for spotting a repeated call."""
        return self.name + "\x00" + json.dumps(self.arguments, sort_keys=True, default=str)


@dataclass
class Decision:
    """One model turn, read: calls to make, an answer, or an error to feed back."""

    raw: str  # the model's output as text (calls as JSON), for the trace
    thought: str | None = None
    calls: list[Call] = field(default_factory=list)
    answer: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Strategy(Protocol):
    name: str

    def start(
        self, system: str | None, history: list[dict[str, Any]], task: str, tools: Toolbox
    ) -> list[dict[str, Any]]:
        """The opening messages for `task`."""

    def decide(
        self,
        client: Any,
        messages: list[dict[str, Any]],
        tools: Toolbox,
        forced: bool,
        sampling: dict[str, Any],
    ) -> Decision:
        """Ask the model for its next move; forced: it must answer now."""  # fmt: skip

    def record(
        self,
        messages: list[dict[str, Any]],
        decision: Decision,
        results: list[tuple[Call, ToolResult]],
    ) -> None:
        """Append the model's turn and what came of it (observations, or the error)."""


def refused(error: Exception) -> bool:
    """A request the endpoint refused as malformed (400/422): what one answers that does not
    take tool_choice "required", a named function, or `stop` (OpenAI's reasoning models)."""
    status = getattr(error, "status", None) or getattr(error, "status_code", None)
    return status in (400, 422)


def usage(response: Any) -> tuple[int, int]:
    u = getattr(response, "usage", None)
    if u is None:
        return 0, 0
    return int(u.prompt_tokens or 0), int(u.completion_tokens or 0)
