"""code_interpreter: the model's code runs in the agent's python sandbox, in a workspace kept
per conversation (files one call writes, the next call of the conversation reads)."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from sorai.apps.agent.files import Workspace
from sorai.apps.agent.python_tool import run_python
from sorai.server.responses_api.hosted import HostedCall, HostedContext

_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def workspace_dir(app: FastAPI, conversation: str) -> Path:
    root = app.state.sorai.settings.data_path() / "workspaces"
    return root / _SAFE.sub("_", conversation)


class CodeInterpreter:
    kind = "code_interpreter"

    def check(self, spec: dict[str, Any], app: FastAPI) -> None:
        return None  # any container spec: each conversation gets its own workspace

    def function(self, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": self.kind,
            "description": "Run Python code and read what it prints. Files it writes stay "
            "for the next run in this conversation.",
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string"}},
                "required": ["code"],
            },
        }

    async def run(
        self, spec: dict[str, Any], arguments: dict[str, Any], context: HostedContext
    ) -> HostedCall:
        code = arguments.get("code")
        code = code if isinstance(code, str) else ""
        conversation = context.conversation
        folder = workspace_dir(context.app, conversation)
        folder.mkdir(parents=True, exist_ok=True)
        result = await asyncio.to_thread(run_python, code, Workspace(folder))
        logs = result.stdout + result.stderr
        item = {
            "type": "code_interpreter_call",
            "id": f"ci_{uuid.uuid4().hex}",
            "status": "completed" if result.returncode == 0 else "failed",
            "code": code,
            "container_id": conversation,
            "outputs": [{"type": "logs", "logs": logs}],
        }
        return HostedCall(item=item, output=result.observation())
