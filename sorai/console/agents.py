"""/v1/sorai/agents: run an agent on a task, its steps streamed as server-sent events as they
happen, and the traces agent runs saved (--trace-dir, default $SORAI_HOME/agent/traces).

Only tools that touch nothing on the server's disk are offered (the calculator, and search
over an index the operator named): the files and python tools stay with `sorai agent`."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, StreamingResponse

from sorai.console.fields import count, json_body, text
from sorai.console.loopback import client_for
from sorai.console.settings import ConsoleSettings, NotFound
from sorai.errors import SoraiError

router = APIRouter(prefix="/v1/sorai/agents")
TOOLS = ("calculator", "search_documents")
_TRACE = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}\.json$")


def trace_dir(request: Request) -> Path:
    from sorai.apps.agent.trace import default_trace_dir

    settings: ConsoleSettings = request.app.state.console
    return settings.trace_dir or default_trace_dir()


def _event(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n".encode()


@router.post("/run")
async def run_agent(request: Request) -> StreamingResponse:
    from sorai.apps.agent import STRATEGIES, Agent

    body = await json_body(request)
    task = text(body, "task")
    tools = body.get("tools", ["calculator"])
    if not isinstance(tools, list) or any(t not in TOOLS for t in tools):
        raise SoraiError(f"tools must be a list of {', '.join(TOOLS)}, got {tools!r}")
    index = None
    if "search_documents" in tools:
        settings: ConsoleSettings = request.app.state.console
        name = body.get("index")
        if name not in settings.indexes:
            raise SoraiError(
                f"search_documents needs index: one of {', '.join(settings.indexes) or 'none'}"
                f", got {name!r}"
            )
        index = settings.indexes[name]
    strategy = body.get("strategy", "tools")
    iterations = count(body, "max_iterations", 6, 1, 20)
    # Checked before the stream starts, so a bad strategy is a 400 rather than an event.
    if strategy not in STRATEGIES:
        raise SoraiError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def put(item: bytes | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        try:
            with client_for(request, body.get("model")) as client:
                agent = Agent(
                    client,
                    tools=tools,
                    strategy=strategy,
                    max_iterations=iterations,
                    trace_dir=trace_dir(request),
                    on_step=lambda step: put(_event("step", asdict(step))),
                    index=index,
                )
                trace = agent.run(task)
                put(
                    _event(
                        "done",
                        {
                            "answer": trace.answer,
                            "stop_reason": trace.stop_reason,
                            "trace": Path(trace.path or "").name,
                        },
                    )
                )
        except Exception as e:  # the stream has started: the error goes out as an event
            put(_event("error", {"message": str(e) or type(e).__name__}))
        finally:
            put(None)

    async def stream() -> AsyncIterator[bytes]:
        worker = asyncio.create_task(asyncio.to_thread(work))
        while (item := await queue.get()) is not None:
            yield item
        await worker

    return StreamingResponse(stream(), media_type="text/event-stream")


@router.get("/traces")
async def list_traces(request: Request) -> JSONResponse:
    folder = trace_dir(request)
    files = sorted(folder.glob("*.json"), reverse=True)[:200] if folder.is_dir() else []
    items = []
    for path in files:
        if not _TRACE.match(path.name):
            continue
        try:
            data = json.loads(path.read_text("utf-8"))
        except ValueError:
            continue
        items.append(
            {
                "id": path.name,
                "task": data.get("task"),
                "answer": data.get("answer"),
                "stop_reason": data.get("stop_reason"),
                "steps": len(data.get("steps", [])),
                "started_at": data.get("started_at"),
            }
        )
    return JSONResponse({"object": "list", "data": items})


@router.get("/traces/{trace_id}")
async def get_trace(request: Request, trace_id: str) -> JSONResponse:
    path = trace_dir(request) / trace_id
    if not _TRACE.match(trace_id) or not path.is_file():
        raise NotFound(f"no agent trace {trace_id!r}")
    return JSONResponse(json.loads(path.read_text("utf-8")))
