"""`sorai serve`: load the model into an AsyncEngine and run the app under uvicorn.

SIGTERM and SIGINT stop it gracefully: no new connections, in-flight requests get
shutdown_timeout seconds, then the engine stops; the process then exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import uvicorn

from sorai.server.app import create_app
from sorai.server.state import ServerSettings

if TYPE_CHECKING:
    from sorai.engine.async_engine import AsyncEngine


class _Server(uvicorn.Server):
    """uvicorn.Server that announces its URL once listening and exits 0 on a signal."""

    def __init__(self, config: uvicorn.Config, announce: Callable[[int], None]) -> None:
        super().__init__(config)
        self._announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            self._announce(self.servers[0].sockets[0].getsockname()[1])

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the caught signal after shutting down, which would kill the process
        # with it (exit -15 / KeyboardInterrupt); a clean stop should exit 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(
    engine: AsyncEngine,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> int:
    """Serve until stopped; returns the exit status."""
    app = create_app(engine, settings)
    name = app.state.sorai.model_names[0]

    def announce(bound_port: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        print(f"sorai serving {name} at http://{shown}:{bound_port}/v1", flush=True)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout)),
        # One process: the engine owns the model and the KV cache.
        workers=1,
    )
    server = _Server(config, announce)
    asyncio.run(server.serve())
    if not server.started:
        print(f"sorai: error: could not listen on {host}:{port}", file=sys.stderr)
        return 1
    return 0
