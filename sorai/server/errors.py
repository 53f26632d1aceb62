"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and their statuses.

The openai client picks its exception class from the HTTP status (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 413/422 other 4xx, 429 RateLimitError, 5xx
InternalServerError), so every failure here maps to the status a client expects; a user's
mistake is never a 422 or a 500.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sorai.engine.params import SamplingParams
from sorai.errors import (
    ContextLengthError,
    EngineDeadError,
    QueueFullError,
    SamplingError,
    SoraiError,
)

logger = logging.getLogger("sorai.server")

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An error response: raise it anywhere in a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# SamplingError messages start with the field's name ("top_p must be in [0, 1], got 2.0");
# other first words ("the JSON schema is not valid") name no field.
_LEADING_NAME = re.compile(r"^([a-z_]+) ")
_FIELD_NAMES = frozenset(SamplingParams.field_names()) - {"guided"}


def from_sorai_error(exc: SoraiError) -> APIError:
    """The API error for an error the engine, tokenizer or sampling parameters raised."""
    message = str(exc)
    if isinstance(exc, QueueFullError):
        return APIError(
            429,
            message or "the server is busy (request queue full); retry later",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, EngineDeadError):
        return engine_unavailable(message)
    param = getattr(exc, "param", None)
    if param is None:
        match = _LEADING_NAME.match(message)
        name = match.group(1) if match else None
        param = name if name in _FIELD_NAMES and isinstance(exc, SamplingError) else None
    code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
    return bad_request(message, param=param, code=code)


def engine_unavailable(message: str = "") -> APIError:
    return APIError(
        503,
        message or "the inference engine has stopped and serves no more requests",
        type=SERVER_ERROR,
        code="engine_unavailable",
    )


def describe_validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """A 400 naming the first bad field, as `messages.0.role`, and what was wrong with it."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    # FastAPI prefixes locations with "body"; pydantic adds the union member it tried
    # ("str", "list[int]", "function-after[...]"), which only confuses a reader.
    loc = [
        str(part)
        for part in first.get("loc", ())
        if part != "body" and not (isinstance(part, str) and ("[" in part or part in _TYPES))
    ]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        text = f"missing required parameter '{param}'"
    elif param:
        text = f"invalid value for '{param}': {message}"
    else:
        text = message
    more = len(errors) - 1
    if more:
        text += f" (and {more} more error{'s' if more > 1 else ''})"
    return bad_request(text, param=param)


_TYPES = {"str", "int", "float", "bool", "list", "dict", "none", "is-instance"}


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can produce, in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(SoraiError)
    async def _sorai_error(request: Request, exc: SoraiError) -> JSONResponse:
        return from_sorai_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return describe_validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        error_type = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
        return APIError(
            exc.status_code, message, type=error_type, headers=getattr(exc, "headers", None)
        ).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s %s", request.method, request.url.path)
        return APIError(
            500, f"internal server error ({type(exc).__name__})", type=SERVER_ERROR
        ).response()
