"""Runs batches: each line of the input file is sent to this app's own endpoint in-process,
at batch priority (interactive requests run first in the same engine), a few at a time; each
finished line is on disk at once (batch_store.py), so a restart resumes where it stopped.
At the end the output and error files are written in OpenAI's format.

A line starts only when client requests have been quiet for YIELD_QUIET_S (or it has waited
YIELD_MAX_S): starting one is CPU work on the server's own cores (the request's parsing, its
prompt's rendering and tokenizing, its prompt's prefill steps), which a client's first token
would otherwise wait behind. Lines already running go on, behind the clients' in the engine."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import httpx

from sorai.server.auth import TRUSTED
from sorai.server.batch_store import BatchStore
from sorai.server.files_store import FileStore
from sorai.server.runner import PRIORITY

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("sorai.server")

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
BATCH_PRIORITY = 1
# A new line waits for client requests to have been quiet this long, but never longer than
# YIELD_MAX_S: steady client traffic slows a batch, it never stops it.
YIELD_QUIET_S = 0.25
YIELD_MAX_S = 2.0
YIELD_POLL_S = 0.02


class BatchRunner:
    """The app's batches in flight: one task per batch, `concurrency` lines at a time each."""

    def __init__(self, app: ASGIApp, files: FileStore, batches: BatchStore, concurrency: int):
        self.app = app
        self.files = files
        self.batches = batches
        self.concurrency = concurrency
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def resume(self) -> None:
        """Pick up the batches a stopped (or killed) server left unfinished."""
        for batch in self.batches.unfinished():
            self.submit(batch["id"])

    def submit(self, batch_id: str) -> None:
        task = asyncio.create_task(self._run(batch_id), name=f"batch {batch_id}")
        self._tasks[batch_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(batch_id, None))

    async def stop(self) -> None:
        """Stop at shutdown; the batches stay unfinished on disk, for the next start."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, batch_id: str) -> None:
        try:
            await self._lines(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug, not a bad line: the batch fails, saying why
            logger.exception("batch %s failed", batch_id)
            self._update(
                batch_id,
                status="failed",
                failed_at=int(time.time()),
                errors={"object": "list", "data": [{"code": "server_error", "message": str(exc)}]},
            )

    async def _lines(self, batch_id: str) -> None:
        batch = self.batches.get(batch_id)
        assert batch is not None
        jobs, invalid = parse_input(self.files.content(batch["input_file_id"]), batch["endpoint"])
        done = self.batches.finished_lines(batch_id)
        for line, error in invalid.items():
            if line not in done:
                record = _error_record(error.get("custom_id"), None, "invalid_request", error)
                self.batches.record(batch_id, line, "error", record)
                done[line] = ("error", record)
        total = len(jobs) + len(invalid)
        if batch["status"] == "validating":
            batch = self._update(batch_id, status="in_progress", in_progress_at=int(time.time()))
        self._count(batch_id, total, done)
        gate = asyncio.Semaphore(self.concurrency)
        expires_at = batch["expires_at"]

        async def one(line: int, job: dict[str, Any]) -> None:
            async with gate:
                await self._yield_to_clients()
                if self._stopping(batch_id) or self._shutting_down() or time.time() > expires_at:
                    return
                kind, record = await self._call(job)
                if kind == "error" and self._shutting_down():
                    return  # ended by the shutdown, not by its request: it runs after a restart
                self.batches.record(batch_id, line, kind, record)
                done[line] = (kind, record)
                self._count(batch_id, total, done)

        pending = [one(line, job) for line, job in jobs.items() if line not in done]
        await asyncio.gather(*pending)
        if len(done) < total and self._shutting_down():
            return  # unfinished on disk: the next start resumes it
        self._finish(batch_id, total, done, jobs)

    async def _yield_to_clients(self) -> None:
        """Wait while client requests run or ended within YIELD_QUIET_S, for at most
        YIELD_MAX_S."""
        running = self.app.state.sorai.running
        loop = asyncio.get_running_loop()
        deadline = loop.time() + YIELD_MAX_S
        while loop.time() < deadline and not running.stopping:
            quiet = time.monotonic() - running.interactive_ended
            if not running.interactive() and quiet >= YIELD_QUIET_S:
                return
            await asyncio.sleep(YIELD_POLL_S)

    def _shutting_down(self) -> bool:
        return self.app.state.sorai.running.stopping

    def _stopping(self, batch_id: str) -> bool:
        batch = self.batches.get(batch_id)
        return batch is None or batch["status"] == "cancelling"

    async def _call(self, job: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        token = PRIORITY.set(BATCH_PRIORITY)
        try:
            transport = httpx.ASGITransport(app=_Trusted(self.app))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://batch", timeout=None
            ) as client:
                reply = await client.post(job["url"], json=job["body"])
        finally:
            PRIORITY.reset(token)
        try:
            body = reply.json()
        except ValueError:
            body = {"error": {"message": reply.text, "type": "server_error", "code": None}}
        request_id = body.get("id") if isinstance(body, dict) else None
        response = {
            "status_code": reply.status_code,
            "request_id": request_id or f"req_{uuid.uuid4().hex}",
            "body": body,
        }
        if reply.status_code == 200:
            record = {"id": _line_id(), "custom_id": job["custom_id"], "response": response}
            return "output", {**record, "error": None}
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        code = error.get("code") or "request_failed"
        return "error", _error_record(job["custom_id"], response, code, error)

    def _count(self, batch_id: str, total: int, done: dict[int, tuple[str, Any]]) -> None:
        failed = sum(1 for kind, _ in done.values() if kind == "error")
        counts = {"total": total, "completed": len(done) - failed, "failed": failed}
        self._update(batch_id, request_counts=counts)

    def _finish(
        self,
        batch_id: str,
        total: int,
        done: dict[int, tuple[str, dict[str, Any]]],
        jobs: dict[int, dict[str, Any]],
    ) -> None:
        batch = self.batches.get(batch_id)
        assert batch is not None
        now = int(time.time())
        cancelled = batch["status"] == "cancelling"
        expired = not cancelled and len(done) < total
        if expired:
            # Lines the window closed on go to the error file, as OpenAI's expired batches do.
            for line, job in jobs.items():
                if line not in done:
                    error = {"message": "the batch's completion_window ended first"}
                    done[line] = (
                        "error",
                        _error_record(job["custom_id"], None, "batch_expired", error),
                    )
        self._update(batch_id, status="finalizing", finalizing_at=now)
        files = {}
        for kind in ("output", "error"):
            records = [done[line][1] for line in sorted(done) if done[line][0] == kind]
            if records:
                data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                name = f"{batch_id}_{kind}.jsonl"
                files[f"{kind}_file_id"] = self.files.add(data.encode(), name, "batch_output")["id"]
        if cancelled:
            final = {"status": "cancelled", "cancelled_at": now}
        elif expired:
            final = {"status": "expired", "expired_at": now}
        else:
            final = {"status": "completed", "completed_at": now}
        self._count(batch_id, total, done)
        self._update(batch_id, **files, **final)

    def _update(self, batch_id: str, **fields: Any) -> dict[str, Any]:
        batch = self.batches.get(batch_id)
        assert batch is not None
        batch.update(fields)
        self.batches.put(batch)
        return batch


def parse_input(
    data: bytes, endpoint: str
) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """A batch input file -> (line number -> its request, line number -> why it is malformed).
    Line numbers count from 1; blank lines are skipped."""
    jobs: dict[int, dict[str, Any]] = {}
    invalid: dict[int, dict[str, Any]] = {}
    seen: set[str] = set()
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        if not raw.strip():
            continue
        custom_id = None
        try:
            line = json.loads(raw)
            if not isinstance(line, dict):
                raise ValueError("a line must be a JSON object")
            custom_id = line.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                raise ValueError("custom_id must be a non-empty string")
            if custom_id in seen:
                raise ValueError(f"custom_id {custom_id!r} is used by an earlier line")
            if line.get("method", "POST") != "POST":
                raise ValueError(f"method must be 'POST', got {line.get('method')!r}")
            # One batch may mix endpoints (chat and embeddings lines, say), a superset of
            # OpenAI's one endpoint per batch; a line without a url goes to the batch's.
            url = line.get("url", endpoint)
            if url not in ENDPOINTS:
                raise ValueError(f"url must be one of {', '.join(ENDPOINTS)}; got {url!r}")
            body = line.get("body")
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object (the request's body)")
            if body.get("stream"):
                raise ValueError("a batch line cannot be streamed (body.stream must be false)")
        except (ValueError, json.JSONDecodeError) as exc:
            message = f"line {number}: {exc}"
            invalid[number] = {"message": message, "line": number, "custom_id": custom_id}
            continue
        seen.add(custom_id)
        jobs[number] = {"custom_id": custom_id, "url": url, "body": body}
    return jobs, invalid


def _error_record(
    custom_id: str | None, response: dict[str, Any] | None, code: str, error: dict[str, Any]
) -> dict[str, Any]:
    detail = {"code": code, "message": error.get("message", "")}
    if "line" in error:
        detail["line"] = error["line"]
    return {"id": _line_id(), "custom_id": custom_id, "response": response, "error": detail}


def _line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


class _Trusted:
    """The app, for requests made in this process: they skip the API-key check."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app({**scope, TRUSTED: True}, receive, send)
