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
from sorai.apps.agent.tools import MAX_OBSERVATION
from sorai.server.responses_api.hosted import HostedCall, HostedContext

_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def workspace_dir(app: FastAPI, conversation: str) -> Path:
    root = app.state.sorai.settings.data_path() / "workspaces"
    return root / _SAFE.sub("_", conversation)


class CodeInterpreter:
    kind = "code_interpreter"
    phase = "interpreting"

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
        # The logs are all the item carries (OpenAI's shape): they also say how the run ended,
        # so the model (replay) and the client can tell a time-out from an error.
        if result.timed_out:
            logs += f"\n[killed: the code ran past its time limit ({result.seconds:.1f} s)]"
        elif result.returncode:
            logs += f"\n[exit code {result.returncode}]"
        item = {
            **self.pending(context.item_id, arguments),
            "status": "completed" if result.returncode == 0 else "failed",
            "container_id": conversation,
            "outputs": [{"type": "logs", "logs": logs}],
        }
        return HostedCall(item=item)

    def pending(self, item_id: str, arguments: dict[str, Any]) -> dict[str, Any]:
        code = arguments.get("code")
        return {
            "type": "code_interpreter_call",
            "id": item_id or f"ci_{uuid.uuid4().hex}",
            "status": "in_progress",
            "code": code if isinstance(code, str) else "",
            "container_id": "",
            "outputs": None,
        }

    def replay(self, item: dict[str, Any]) -> tuple[dict[str, Any], str]:
        logs = "".join(o["logs"] for o in item.get("outputs") or [] if o.get("type") == "logs")
        # A traceback ends the logs: the end is what a long output keeps.
        text = logs if len(logs) <= MAX_OBSERVATION else "…" + logs[-MAX_OBSERVATION:]
        text = text or "(no output)"
        if item.get("status") == "failed":
            text = f"the code failed:\n{text}"
        return {"code": str(item.get("code") or "")}, text
