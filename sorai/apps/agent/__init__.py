"""Agents: a model that calls tools (ReAct text or native tool calls) until it can answer.

import sorai
from sorai.apps.agent import Agent

with sorai.connect() as client:
    trace = Agent(client, tools=["calculator"]).run("What is 1234 * 5678?")
    print(trace.answer)
"""

from __future__ import annotations

from sorai.apps.agent.agent import STRATEGIES, Agent
from sorai.apps.agent.files import Workspace
from sorai.apps.agent.tools import Tool, Toolbox, ToolFailure, ToolResult, tool
from sorai.apps.agent.trace import Printer, Step, Trace

__all__ = [
    "STRATEGIES",
    "Agent",
    "Printer",
    "Step",
    "Tool",
    "ToolFailure",
    "ToolResult",
    "Toolbox",
    "Trace",
    "Workspace",
    "tool",
]
