"""What the apps' tests need to stand up a small OpenAI-compatible endpoint double on loopback:
a handler base that reads and writes JSON quietly, a server running it, and a port nothing
listens on."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class JSONHandler(BaseHTTPRequestHandler):
    """A request handler speaking JSON both ways, without access logs on stderr."""

    def read_json(self) -> Any:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def send_json(self, status: int, body: Any) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


def embeddings_body(model: str, vectors: Sequence[Sequence[float]]) -> dict[str, Any]:
    """A /v1/embeddings response, as OpenAI shapes it."""
    return {
        "object": "list",
        "model": model,
        "data": [{"object": "embedding", "index": i, "embedding": list(v)} for i, v in
                 enumerate(vectors)],
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }  # fmt: skip


class LoopbackServer:
    """`handler` served on a free loopback port from a daemon thread; `url` is its root."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        # A short poll: shutdown() waits for the loop to look (0.5 s by default, per server).
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """The root URL of `handler` served on loopback for the block."""
    server = LoopbackServer(handler)
    try:
        yield server.url
    finally:
        server.close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
