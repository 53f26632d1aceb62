"""Adds the console to the server's app: the page and its assets at `/` and `/console/`
(open: they hold no data), and the /v1/sorai/... endpoints the pages read (behind the API's
keys like every other /v1 route)."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from starlette.responses import FileResponse, JSONResponse
from starlette.staticfiles import StaticFiles

from sorai.console import agents, data, evals, training
from sorai.console.settings import ConsoleSettings, NotFound
from sorai.server.errors import APIError

STATIC = resources.files("sorai.console") / "static"
PAGE_PATH = "/"
ASSETS_PATH = "/console"


def install(app: FastAPI, settings: ConsoleSettings | None = None) -> FastAPI:
    """`app` with the console added; returns it."""
    app.state.console = settings or ConsoleSettings()
    static = str(STATIC)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return APIError(404, str(exc), code="not_found").response()

    @app.get(PAGE_PATH, include_in_schema=False)
    async def page() -> FileResponse:
        # no-cache: a browser revalidates, so a new version of sorai shows its new page.
        return FileResponse(f"{static}/index.html", headers={"Cache-Control": "no-cache"})

    for router in (data.router, evals.router, training.router, agents.router):
        app.include_router(router)
    app.mount(ASSETS_PATH, StaticFiles(directory=static), name="console")
    return app
