"""What a run did, step by step: written as JSON when it ends, printed as it happens if asked."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from sorai import hub


def default_trace_dir() -> Path:
    """`$SORAI_HOME/agent/traces`."""
    return hub.sorai_home() / "agent" / "traces"


@dataclass
class Step:
    """One model turn and what came of it. kind: "tool" (a call and its observation), "error"
    (output the agent could not use; the problem was fed back), or "answer"."""

    number: int
    kind: str
    thought: str | None = None
    tool: str | None = None
    arguments: Any = None
    observation: str | None = None
    ok: bool = True
    answer: str | None = None
    forced: bool = False  # the final answer was demanded (a limit ran out, a repeated call)
    model_output: str | None = None  # the model's text, or its call as JSON
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model_seconds: float = 0.0
    tool_seconds: float = 0.0


@dataclass
class Trace:
    task: str
    strategy: str
    model: str
    started_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None
    # "answer", "max_iterations", "time_limit" or "repeated_call" (the last three: forced)
    stop_reason: str | None = None
    seconds: float = 0.0
    path: str | None = None  # where the JSON was written

    @property
    def prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self.steps)

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.steps)

    @property
    def tool_calls(self) -> list[Step]:
        return [s for s in self.steps if s.kind == "tool"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prompt_tokens"] = self.prompt_tokens
        data["completion_tokens"] = self.completion_tokens
        return data

    def write(self, directory: str | Path) -> Path:
        folder = Path(directory).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.json"
        text = json.dumps(self.to_dict(), ensure_ascii=False, indent=2, default=str) + "\n"
        # Whole or not at all: written beside it, then renamed over (a Ctrl-C or a full disk
        # mid-write leaves no truncated JSON).
        partial = path.with_name(f".{path.name}.partial")
        try:
            partial.write_text(text, encoding="utf-8")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        self.path = str(path)
        return path


def _indent(text: str, prefix: str = "    ") -> str:
    lines = text.strip().splitlines() or [""]
    if len(lines) > 12:
        lines = lines[:12] + [f"… ({len(lines) - 12} more lines)"]
    return "\n".join(prefix + line for line in lines)


class Printer:
    """Prints each step as it happens (to stderr by default), in the ReAct vocabulary."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream

    def __call__(self, step: Step) -> None:
        out = self.stream or sys.stderr
        lines = [f"[{step.number}]"]
        if step.thought:
            lines.append(f"  Thought: {step.thought.strip()}")
        if step.kind == "tool":
            arguments = json.dumps(step.arguments, ensure_ascii=False)
            lines.append(f"  Action: {step.tool} {arguments}")
            status = "" if step.ok else " (failed)"
            lines.append(f"  Observation{status} ({step.tool_seconds:.2f} s):")
            lines.append(_indent(step.observation or ""))
        elif step.kind == "error":
            lines.append("  Unusable output, fed back:")
            lines.append(_indent(step.observation or ""))
        else:
            label = "Final Answer (forced)" if step.forced else "Final Answer"
            lines.append(f"  {label}: {step.answer}")
        print("\n".join(lines), file=out, flush=True)
