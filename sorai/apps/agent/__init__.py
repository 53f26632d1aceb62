"""Agents: a model that calls tools (ReAct text or native tool calls) until it can answer.

    import sorai
    from sorai.apps.agent import Agent

    with sorai.connect() as client:
        trace = Agent(client, tools=["calculator"]).run("What is 1234 * 5678?")
        print(trace.answer)

The names below load on first use, so `sorai.cli` (which imports `.command`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "Agent": "agent",
    "STRATEGIES": "agent",
    "Workspace": "files",
    "Tool": "tools",
    "Toolbox": "tools",
    "ToolFailure": "tools",
    "ToolResult": "tools",
    "tool": "tools",
    "Printer": "trace",
    "Step": "trace",
    "Trace": "trace",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
