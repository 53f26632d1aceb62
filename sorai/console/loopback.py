"""The console's server-side work (ask, vector search, agent runs) talks to this same server
through the apps' client, with the caller's own key: it can do nothing the caller could not."""

from __future__ import annotations

from fastapi import Request

from sorai.apps.client import Client


def caller_key(request: Request) -> str | None:
    """The bearer key of the request (None on an open server that was sent none)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def client_for(request: Request, model: str | None = None) -> Client:
    """A client of this server on the address the request came in on, with the caller's key;
    model: the chat model (default the first served)."""
    host, port = request.scope["server"]
    host = f"[{host}]" if ":" in host else host
    return Client.connect(
        f"http://{host}:{port}/v1", api_key=caller_key(request), model=model, max_retries=0
    )
