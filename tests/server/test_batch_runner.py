"""The batch runner on its own, over stand-in apps: one whose endpoint always answers 503 (the
real one answers so only mid-shutdown, which a test cannot hold still), one that counts the
lines it is sent (whether a line starts while client requests run is the runner's decision,
not the engine's). The live cases, the SIGKILL restart among them, are in test_batches.py."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from sorai.server import batch_runner
from sorai.server.batch_runner import BatchRunner, parse_input
from sorai.server.batch_store import BatchStore
from sorai.server.files_store import FileStore
from sorai.server.lifecycle import Running


def _unavailable_app(stopping: bool) -> Starlette:
    async def chat(request):  # noqa: ANN001, ANN202
        body = {"error": {"message": "shutting down", "type": "server_error", "code": None}}
        return JSONResponse(body, status_code=503)

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    running = Running()
    running.stopping = stopping
    app.state.sorai = SimpleNamespace(running=running)
    return app


def _counting_app() -> tuple[Starlette, list[str]]:
    """An app answering every line at once; the list: the lines it was sent, in order."""
    sent: list[str] = []

    async def chat(request):  # noqa: ANN001, ANN202
        sent.append((await request.json())["messages"][0]["content"])
        return JSONResponse({"id": f"chatcmpl-{len(sent)}", "object": "chat.completion"})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    app.state.sorai = SimpleNamespace(running=Running())
    return app, sent


class _ClientRequest:
    """A client's request running on the engine, as Running.generations holds it."""

    priority = 0

    def expire(self, error: object) -> None:
        return None


def _batch(tmp_path: Path) -> tuple[BatchStore, FileStore]:
    files, batches = FileStore(tmp_path), BatchStore(tmp_path)
    lines = [
        {"custom_id": f"c{i}", "body": {"messages": [{"role": "user", "content": f"c{i}"}]}}
        for i in range(3)
    ]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    upload = files.add(data, "in.jsonl", "batch")
    now = int(time.time())
    batch = {
        "id": "batch_test",
        "created_at": now,
        "status": "validating",
        "endpoint": "/v1/chat/completions",
        "input_file_id": upload["id"],
        "expires_at": now + 3600,
    }
    batches.put(batch)
    return batches, files


def _run_batch(tmp_path: Path, stopping: bool) -> tuple[dict, BatchStore, FileStore]:
    batches, files = _batch(tmp_path)
    runner = BatchRunner(_unavailable_app(stopping), files, batches, concurrency=2)
    asyncio.run(runner._run("batch_test"))
    result = batches.get("batch_test")
    assert result is not None
    return result, batches, files


def test_lines_cut_by_a_shutdown_stay_unfinished(tmp_path: Path) -> None:
    batch, batches, _ = _run_batch(tmp_path, stopping=True)
    assert batch["status"] == "in_progress"
    assert batches.finished_lines("batch_test") == {}


def test_refused_lines_go_to_the_error_file(tmp_path: Path) -> None:
    batch, _, files = _run_batch(tmp_path, stopping=False)
    assert batch["status"] == "completed" and batch.get("output_file_id") is None
    errors = [json.loads(x) for x in files.content(batch["error_file_id"]).splitlines()]
    assert sorted(e["custom_id"] for e in errors) == ["c0", "c1", "c2"]
    assert {e["response"]["status_code"] for e in errors} == {503}


def test_malformed_lines_are_named_by_their_number() -> None:
    data = b'{"custom_id": "a", "body": {}}\n\nnot json\n{"custom_id": "a", "body": {}}\n'
    jobs, invalid = parse_input(data, "/v1/embeddings")
    assert list(jobs) == [1] and jobs[1]["url"] == "/v1/embeddings"
    assert sorted(invalid) == [3, 4]
    assert invalid[3]["message"].startswith("line 3:")
    assert "used by an earlier line" in invalid[4]["message"]


def test_no_line_starts_while_a_client_request_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_runner, "YIELD_MAX_S", 3600.0)
    batches, files = _batch(tmp_path)
    app, sent = _counting_app()
    running = app.state.sorai.running
    client = _ClientRequest()

    async def scenario() -> list[str]:
        running.generations.add(client)
        task = asyncio.create_task(
            BatchRunner(app, files, batches, concurrency=2)._run("batch_test")
        )
        await asyncio.sleep(0.3)  # ample for the stand-in to answer all three, were they sent
        before = list(sent)
        running.generations.discard(client)
        running.interactive_ended = float("-inf")  # ended long ago: no quiet spell to wait
        await task
        return before

    assert asyncio.run(scenario()) == []
    assert sorted(sent) == ["c0", "c1", "c2"]
    assert batches.get("batch_test")["request_counts"]["completed"] == 3


def test_steady_client_traffic_slows_a_batch_but_never_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_runner, "YIELD_MAX_S", 0.05)
    batches, files = _batch(tmp_path)
    app, sent = _counting_app()
    app.state.sorai.running.generations.add(_ClientRequest())  # never ends
    asyncio.run(BatchRunner(app, files, batches, concurrency=2)._run("batch_test"))
    assert sorted(sent) == ["c0", "c1", "c2"]
    assert batches.get("batch_test")["status"] == "completed"
