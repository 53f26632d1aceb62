"""The Responses API's hosted tools, added to the server's app from above it (as the console
is): file_search over document indexes built from uploaded files (vector stores), and
code_interpreter on the agent's sandboxed python tool, one workspace per conversation."""

from __future__ import annotations

from fastapi import FastAPI

from sorai.hosted_tools import vector_stores
from sorai.hosted_tools.code_interpreter import CodeInterpreter
from sorai.hosted_tools.file_search import FileSearch
from sorai.server.responses_api.hosted import register


def install(app: FastAPI) -> FastAPI:
    """`app` with file_search, code_interpreter and /v1/vector_stores; returns it."""
    register(app, FileSearch())
    register(app, CodeInterpreter())
    app.include_router(vector_stores.router)
    return app
