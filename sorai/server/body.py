"""Request bodies: a size limit (413) and JSON parsing whose every failure is a 400."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sorai.server.errors import APIError, bad_request, describe_validation_error

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
UPLOAD_PATH = "/v1/files"
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024

# A JSON escape of a UTF-16 surrogate: only then can the parsed body hold a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")

Model = TypeVar("Model", bound=BaseModel)


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"request body too large: the limit is {limit} bytes",
        code="request_too_large",
    )


class BodyLimitMiddleware:
    """Reads the whole body up front (refusing more than `limit` bytes), then replays it.

    Buffering lets the 413 go out before the app starts, whether or not the client sent a
    Content-Length; after the replay, receive() passes through so the app still sees the
    client's disconnect.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int = DEFAULT_MAX_BODY_BYTES,
        upload_limit: int | None = None,
    ) -> None:
        self.app = app
        self.limit = limit
        # File uploads (POST /v1/files) have a limit of their own.
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        if self.upload_limit is not None and scope["path"] == UPLOAD_PATH:
            limit = self.upload_limit
        declared = _content_length(scope)
        if declared == -1:
            await bad_request("malformed Content-Length header").response()(scope, receive, send)
            return
        if declared is not None and declared > limit:
            await _too_large(limit).response()(scope, receive, send)
            return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(limit).response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    """The declared length, None when absent, -1 when malformed."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return -1
            return length if length >= 0 else -1
    return None


async def read_json(request: Request, model: type[Model]) -> Model:
    """The body as `model`: bad UTF-8, bad JSON, a non-object or a bad field are 400s."""
    raw = await request.body()
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad_request(
            f"the request body is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    if _SURROGATE_ESCAPE.search(raw):
        _refuse_lone_surrogates(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise describe_validation_error(exc) from None


def _refuse_lone_surrogates(data: dict[str, Any]) -> None:
    """A 400 naming the first field whose text holds a lone UTF-16 surrogate ("\\ud800").

    JSON may escape one, Python keeps it, but it is not a character: it cannot be encoded as
    UTF-8, so the tokenizer, the grammar compiler and the response writer would each fail on it.
    """
    stack: list[tuple[str, Any]] = [(key, value) for key, value in reversed(data.items())]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            bad = _lone_surrogate(value)
        elif isinstance(value, dict):
            bad = next((k for k in value if _lone_surrogate(k) is not None), None)
            if bad is not None:
                raise bad_request(
                    f"{path} has a key holding a lone UTF-16 surrogate, which is not valid "
                    "Unicode; send text that is valid UTF-8",
                    param=path,
                )
            stack.extend((f"{path}.{k}", v) for k, v in reversed(value.items()))
            continue
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", v) for i, v in reversed(list(enumerate(value))))
            continue
        else:
            continue
        if bad is not None:
            raise bad_request(
                f"{path} holds a lone UTF-16 surrogate (\\u{ord(value[bad]):04x} at character "
                f"{bad}), which is not valid Unicode; send text that is valid UTF-8",
                param=path,
            )


def _lone_surrogate(text: str) -> int | None:
    """Where `text` holds a surrogate code point, or None (a valid pair was already joined by
    the JSON parser into one character)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None
