"""sorai's server in this process, on a loopback port: the "no URL" backend of the apps'
client. Apps still speak the OpenAI protocol to it, exactly as to a remote endpoint."""

from __future__ import annotations

import os
import secrets
import threading
import time

import uvicorn
from fastapi import FastAPI

from sorai import hub
from sorai.server.app import create_app
from sorai.server.auth import APIKeys
from sorai.server.state import ServerSettings


class ServerThread:
    """A uvicorn server in a daemon thread of this process, on a free loopback port."""

    def __init__(self, app: FastAPI) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", http="h11"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def start(self, timeout: float = 120.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the in-process server exited during startup")
            if time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


class LocalServer:
    """Loads `model` into an AsyncEngine and serves it on 127.0.0.1 with a one-off API key,
    with `embedding_model` (loaded on its first request) for /v1/embeddings."""

    def __init__(
        self,
        model: str | os.PathLike = hub.DEFAULT_MODEL,
        adapter: str | None = None,
        embedding_model: str = hub.DEFAULT_EMBEDDING_MODEL,
    ) -> None:
        from sorai.engine.async_engine import AsyncEngine

        self.api_key = "sk-local-" + secrets.token_hex(16)
        engine = AsyncEngine.from_model(model, adapter=adapter)
        settings = ServerSettings(api_keys=APIKeys([self.api_key]), embedding_model=embedding_model)
        self.thread = ServerThread(create_app(engine, settings)).start()
        self.url = self.thread.url + "/v1"
        self.model = engine.model_name

    def close(self) -> None:
        self.thread.stop()
