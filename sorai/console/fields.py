"""The JSON bodies the console's POST endpoints take, read and checked (400 with the field's
name and what it accepts)."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from sorai.errors import SoraiError


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise SoraiError("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise SoraiError("the request body must be a JSON object")
    return body


def text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SoraiError(f"{key} must be a non-empty string, got {value!r}")
    return value


def count(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SoraiError(f"{key} must be an integer in [{low}, {high}], got {value!r}")
    return value
