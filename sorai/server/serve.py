"""`sorai serve`: load the model into an AsyncEngine and run the app under uvicorn.

The port is bound before the model loads (bind()), so a port in use fails at once. SIGTERM and
SIGINT stop it gracefully: no new connections, in-flight requests get shutdown_timeout seconds,
then those still running end with an error (a stream: a final error event) and the engine stops;
the process then exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

from sorai.errors import SoraiError
from sorai.server.app import create_app
from sorai.server.state import ServerSettings, ServerState

# Time the final error events get to go out after the grace period, before uvicorn cuts
# the connections that are left.
_CLOSE_MARGIN_S = 5.0

if TYPE_CHECKING:
    from sorai.engine.async_engine import AsyncEngine


class _Server(uvicorn.Server):
    """uvicorn.Server that announces its URL once listening and exits 0 on a signal."""

    def __init__(
        self,
        config: uvicorn.Config,
        announce: Callable[[int], None],
        state: ServerState,
        grace: float,
    ) -> None:
        super().__init__(config)
        self._announce = announce
        self._state = state
        self._grace = grace
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: object) -> None:
        super().handle_exit(sig, frame)  # type: ignore[arg-type]
        if self._loop is not None:
            # A signal handler runs between the loop's callbacks; the timers belong on the loop.
            self._loop.call_soon_threadsafe(self._state.running.begin_shutdown, self._grace)

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


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0: a free port), for serve(); SoraiError when the address
    is in use or cannot be bound, so that `sorai serve` fails before the model loads."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SoraiError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    # IPv4 first: "localhost" then means 127.0.0.1, where most clients look.
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    # As uvicorn binds: a port whose old connections linger in TIME_WAIT is free to take.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        hint = " (another server is listening there; pick another --port)" if port else ""
        raise SoraiError(f"cannot listen on {host}:{port}: {why}{hint}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    engine: AsyncEngine,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    sock: socket.socket | None = None,
    extend: Callable[[FastAPI], object] | None = None,
) -> int:
    """Serve until stopped (on `sock` when given, from bind()); returns the exit status.
    extend: called with the app before it serves, to add routes (the web console)."""
    app = create_app(engine, settings)
    if extend is not None:
        extend(app)
    name = app.state.sorai.model_names[0]

    def announce(bound_port: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        print(f"sorai serving {name} at http://{shown}:{bound_port}/v1", flush=True)
        if hasattr(app.state, "console"):
            print(f"console at http://{shown}:{bound_port}/", flush=True)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout + _CLOSE_MARGIN_S),
        # One process: the engine owns the model and the KV cache.
        workers=1,
    )
    server = _Server(config, announce, app.state.sorai, settings.shutdown_timeout)
    asyncio.run(server.serve(sockets=[sock] if sock is not None else None))
    if not server.started:
        print(f"sorai: error: could not listen on {host}:{port}", file=sys.stderr)
        return 1
    return 0
