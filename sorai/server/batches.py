"""/v1/batches: create (from an uploaded JSONL file), retrieve, list, cancel. The work itself is
batch_runner.py's, started with the app and resumed by it after a restart."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sorai.server.batch_runner import ENDPOINTS, BatchRunner
from sorai.server.batch_store import BatchStore
from sorai.server.body import read_json
from sorai.server.errors import APIError, bad_request
from sorai.server.files import file_store, known_file
from sorai.server.files_store import FileStore
from sorai.server.protocol import _Request
from sorai.server.responses import list_page
from sorai.server.state import get_state

router = APIRouter()

_WINDOW = re.compile(r"^(\d+)([smh])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600}


class BatchRequest(_Request):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


def batch_runner(request: Request) -> BatchRunner:
    """The app's batch runner (its stores opened on first use)."""
    app = request.app
    runner = getattr(app.state, "batch_runner", None)
    if runner is None:
        root = get_state(request).settings.data_path()
        concurrency = get_state(request).settings.batch_concurrency
        runner = BatchRunner(app, file_store(request), BatchStore(root), concurrency)
        app.state.batch_runner = runner
    return runner


@router.post("/v1/batches")
async def create_batch(request: Request) -> Response:
    body = await read_json(request, BatchRequest)
    if body.endpoint not in ENDPOINTS:
        raise bad_request(
            f"endpoint must be one of {', '.join(ENDPOINTS)}; got {body.endpoint!r}",
            param="endpoint",
        )
    match = _WINDOW.match(body.completion_window)
    if match is None or int(match.group(1)) == 0:
        raise bad_request(
            f"completion_window must be a duration such as '24h', '30m' or '90s'; got "
            f"{body.completion_window!r}",
            param="completion_window",
        )
    window = int(match.group(1)) * _SECONDS[match.group(2)]
    record = known_file(request, body.input_file_id, param="input_file_id")
    if record["purpose"] != "batch":
        raise bad_request(
            f"the input file {body.input_file_id!r} has purpose {record['purpose']!r}; upload "
            "it with purpose 'batch'",
            param="input_file_id",
        )
    now = int(time.time())
    batch: dict[str, Any] = {
        "id": f"batch_{uuid.uuid4().hex}",
        "object": "batch",
        "endpoint": body.endpoint,
        "errors": None,
        "input_file_id": body.input_file_id,
        "completion_window": body.completion_window,
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": now,
        "in_progress_at": None,
        "expires_at": now + window,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": body.metadata,
    }
    runner = batch_runner(request)
    runner.batches.put(batch)
    runner.submit(batch["id"])
    return JSONResponse(batch)


@router.get("/v1/batches")
async def list_batches(request: Request, limit: int = 20, after: str | None = None) -> Response:
    return list_page(batch_runner(request).batches.list(), limit, after, "batch")


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(request: Request, batch_id: str) -> Response:
    return JSONResponse(_known(request, batch_id))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> Response:
    batch = _known(request, batch_id)
    if batch["status"] in ("validating", "in_progress"):
        batch.update(status="cancelling", cancelling_at=int(time.time()))
        batch_runner(request).batches.put(batch)
    elif batch["status"] not in ("cancelling", "cancelled"):
        raise APIError(
            409,
            f"batch {batch_id!r} is {batch['status']}: only a validating or in-progress batch "
            "can be cancelled",
            param="batch_id",
            code="batch_not_cancellable",
        )
    return JSONResponse(batch)


def _known(request: Request, batch_id: str) -> dict[str, Any]:
    batch = batch_runner(request).batches.get(batch_id)
    if batch is None:
        raise APIError(404, f"no batch has the id {batch_id!r}", param="batch_id", code="not_found")
    return batch


async def resume_batches(app: Any) -> BatchRunner | None:
    """At startup: the runner, resuming unfinished batches, if this data directory has any."""
    state = app.state.sorai
    root = state.settings.data_path()
    if not BatchStore.exists(root):
        return None
    files = getattr(app.state, "file_store", None) or FileStore(root)
    app.state.file_store = files
    runner = BatchRunner(app, files, BatchStore(root), state.settings.batch_concurrency)
    app.state.batch_runner = runner
    await runner.resume()
    return runner
