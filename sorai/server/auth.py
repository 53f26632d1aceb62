"""API keys: `Authorization: Bearer <key>` against SHA-256 digests of the configured keys.

Only digests are kept, so a memory dump or a log line never shows a key, and digests are
compared with hmac.compare_digest against every configured key, so timing tells nothing about
which (or how much of a) key matched. No keys configured means an open server.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from sorai.errors import SoraiError
from sorai.server.errors import APIError

# Probes and scrapers must work without a key (and expose nothing secret).
OPEN_PATHS = frozenset({"/health", "/metrics"})
# The web console's page and static assets (sorai/console): code, no data; it asks for a key
# before it reads anything, and every data endpoint it reads sits under /v1, behind the key.
CONSOLE_PATHS = frozenset({"/"})
CONSOLE_PREFIX = "/console/"


def is_open(path: str) -> bool:
    """Whether `path` is served without a key."""
    return path in OPEN_PATHS or path in CONSOLE_PATHS or path.startswith(CONSOLE_PREFIX)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class APIKeys:
    """The set of accepted keys, held as digests."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._digests: list[bytes] = []
        for key in keys:
            key = key.strip()
            if not key:
                raise SoraiError("an API key must not be empty")
            self._digests.append(_digest(key))

    @classmethod
    def from_sources(
        cls, keys: Iterable[str] = (), files: Iterable[str | os.PathLike] = ()
    ) -> APIKeys:
        """Keys given directly plus those in files (one per line; blank and # lines skipped)."""
        collected = list(keys)
        for path in files:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise SoraiError(f"cannot read API key file {os.fspath(path)!r}: {exc}") from exc
            lines = [line.strip() for line in text.splitlines()]
            file_keys = [line for line in lines if line and not line.startswith("#")]
            if not file_keys:
                raise SoraiError(f"API key file {os.fspath(path)!r} holds no keys")
            collected += file_keys
        return cls(collected)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, key: str) -> bool:
        digest = _digest(key)
        matched = False
        for known in self._digests:
            # No early exit: every configured key costs the same time whatever the input.
            matched |= hmac.compare_digest(digest, known)
        return matched


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


# A scope key only code in this process can set (a batch's in-process requests): no client's
# request carries it, so it cannot skip the key check.
TRUSTED = "sorai.trusted"


class APIKeyMiddleware:
    """Rejects requests without an accepted key (401), before their body is read."""

    def __init__(self, app: ASGIApp, keys: APIKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.keys.enabled
            or is_open(scope["path"])
            or scope.get(TRUSTED)
        ):
            await self.app(scope, receive, send)
            return
        key = _bearer(scope)
        if key is None:
            error = APIError(
                401,
                "missing API key: send it as the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        elif not self.keys.accepts(key):
            # The key itself is never echoed back or logged.
            error = APIError(
                401,
                "incorrect API key provided",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        else:
            await self.app(scope, receive, send)
            return
        await error.response()(scope, receive, send)
