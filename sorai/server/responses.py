"""What the endpoints share: Server-Sent Events, usage counting, JSON responses, list pages."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from sorai.engine.outputs import RequestOutput
from sorai.errors import SoraiError
from sorai.server.errors import APIError, bad_request, engine_unavailable, from_sorai_error
from sorai.server.protocol import Usage, make_usage

DONE = "data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def json_response(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


def list_page(
    items: list[dict], limit: int, after: str | None, what: str, max_limit: int = 100
) -> Response:
    """OpenAI's cursor-paged list object: up to `limit` of `items` (in the order given) after
    the one whose id is `after`; a 400 for a limit out of [1, max_limit] or an unknown `after`."""
    if not 1 <= limit <= max_limit:
        raise bad_request(f"limit must be in [1, {max_limit}], got {limit}", param="limit")
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise bad_request(f"after: no {what} has the id {after!r}", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    body = {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }
    return JSONResponse(body)


def sse(body: BaseModel, exclude: set[str] | None = None) -> str:
    return f"data: {body.model_dump_json(exclude=exclude)}\n\n"


def error_event(exc: Exception) -> str:
    """An error after the 200 went out: an SSE event the openai client raises as APIError."""
    error = exc if isinstance(exc, APIError) else from_sorai_error(exc)
    return f"data: {error.response().body.decode()}\n\n"


def aborted() -> APIError:
    # The engine aborts a request only when told to: here, when the server is shutting down.
    return engine_unavailable("the request was aborted: the server is shutting down")


class EventStream(StreamingResponse):
    """text/event-stream whose `on_close` always runs, even when the client left before the
    first event (Starlette then cancels the stream without ever starting the iterator)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]):
        super().__init__(
            events,
            media_type="text/event-stream",
            # Proxies (nginx) must not buffer a token stream.
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._events, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._on_close()


async def guarded(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Ends a stream that fails after the 200 with an error event and [DONE]."""
    try:
        async with contextlib.aclosing(events) as inner:
            async for event in inner:
                yield event
    except (SoraiError, APIError) as exc:
        yield error_event(exc)
        yield DONE


class UsageTally:
    """Usage over one API request: each prompt counted once, every choice's tokens."""

    def __init__(self, prompts: int) -> None:
        self._prompt = [0] * prompts
        self._cached = [0] * prompts
        self.completion_tokens = 0

    def add(self, prompt_index: int, output: RequestOutput) -> None:
        self._prompt[prompt_index] = output.prompt_tokens
        self._cached[prompt_index] = max(self._cached[prompt_index], output.cached_tokens)
        self.completion_tokens += sum(len(choice.token_ids) for choice in output.choices)

    def usage(self) -> Usage:
        return make_usage(sum(self._prompt), self.completion_tokens, sum(self._cached))
