"""The FastAPI app: routes, error handlers, auth and body-size middleware, engine lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

import sorai
from sorai.engine.embeddings import EmbeddingEngine
from sorai.server import (
    adapters,
    batches,
    chat,
    completions,
    embeddings,
    files,
    routes,
    vision,
)
from sorai.server.auth import APIKeyMiddleware
from sorai.server.body import BodyLimitMiddleware
from sorai.server.errors import install_error_handlers
from sorai.server.models import ModelLeases, ModelPool
from sorai.server.responses_api import routes as responses_api_routes
from sorai.server.state import ServerSettings, ServerState

if TYPE_CHECKING:
    from sorai.engine.async_engine import AsyncEngine


def create_app(engine: AsyncEngine, settings: ServerSettings | None = None) -> FastAPI:
    """An app serving `engine` (and settings.models' models beside it); the app starts the
    engines on startup and stops them on shutdown."""
    settings = settings or ServerSettings()
    embedding_engine = None
    if settings.embedding_model is not None:
        # Nothing is read yet: the model loads on the first embeddings request.
        embedding_engine = EmbeddingEngine(
            settings.embedding_model, device=settings.embedding_device
        )
    state = ServerState(engine, settings, embedding_engine)
    models: ModelPool | None = settings.models

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        if models is not None:
            await models.start()
        watcher = adapters.start_watching(state)
        await batches.resume_batches(app)
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            runner = getattr(app.state, "batch_runner", None)
            if runner is not None:  # unfinished batches stay on disk for the next start
                await runner.stop()
            # In-flight requests get shutdown_timeout seconds, then the rest are aborted.
            await engine.stop(timeout=settings.shutdown_timeout)
            if models is not None:
                await models.stop(timeout=settings.shutdown_timeout)
            if embedding_engine is not None:
                embedding_engine.close()

    # No /docs: the handlers read their bodies themselves (for 400s instead of 422s), so the
    # generated schema would be empty; OpenAI's own API reference describes these routes.
    app = FastAPI(
        title="sorai",
        version=sorai.__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.sorai = state
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(embeddings.router)
    app.include_router(routes.router)
    app.include_router(vision.router)
    app.include_router(adapters.router)
    # The platform APIs beyond chat (their stores open on first use, under settings.data_dir).
    app.include_router(responses_api_routes.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    # Added last = runs first: a request without a valid key is refused before its body is read.
    app.add_middleware(
        BodyLimitMiddleware, limit=settings.max_body_bytes, upload_limit=settings.max_file_bytes
    )
    app.add_middleware(APIKeyMiddleware, keys=settings.api_keys)
    if models is not None:
        app.add_middleware(ModelLeases, pool=models)  # outermost: sees every response end
    return app
