"""POST /v1/embeddings: the OpenAI request and response around the server's EmbeddingEngine
(sorai/engine/embeddings.py), a sentence-transformers model served next to the chat model."""

from __future__ import annotations

import base64
import logging

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from sorai.engine.embeddings import EmbeddingEngine, Embeddings
from sorai.errors import SoraiError
from sorai.server.body import read_json
from sorai.server.errors import SERVER_ERROR, APIError
from sorai.server.protocol import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from sorai.server.responses import json_response
from sorai.server.runner import unless_disconnected
from sorai.server.state import get_state

log = logging.getLogger("sorai.server")

router = APIRouter()


def _model_not_found(message: str) -> APIError:
    return APIError(404, message, param="model", code="model_not_found")


def _embedding_engine(request: Request, requested: str | None) -> EmbeddingEngine:
    state = get_state(request)
    engine = state.embeddings
    if engine is None:
        raise _model_not_found(
            "this server serves no embedding model (it was started with --embedding-model "
            "none); start it with --embedding-model NAME_OR_PATH to serve one"
        )
    if requested is None or requested == engine.name:
        return engine
    if requested in state.model_names or requested == state.engine.model_name:
        raise _model_not_found(
            f"{requested!r} is a chat model and makes no embeddings; this server's embedding "
            f"model is {engine.name!r}"
        )
    raise _model_not_found(
        f"the model {requested!r} does not exist; this server's embedding model is {engine.name!r}"
    )


async def _embed(engine: EmbeddingEngine, body: EmbeddingRequest) -> Embeddings:
    try:
        await engine.load()
    except SoraiError as e:
        # The request was fine; the server's model is not (a failed pull, a bad directory).
        log.error("embedding model %s could not be loaded: %s", engine.name, e)
        raise APIError(
            503,
            f"the embedding model {engine.name!r} could not be loaded: {e}",
            type=SERVER_ERROR,
            code="model_unavailable",
        ) from None
    # A bad dimensions or token id is a SoraiError: the app's handler makes it a 400.
    return await engine.embed(body.inputs(), dimensions=body.dimensions)


@router.post("/v1/embeddings")
async def create_embeddings(request: Request) -> Response:
    body = await read_json(request, EmbeddingRequest)
    engine = _embedding_engine(request, body.model)
    # A request whose client has gone is dropped from the engine's queue.
    result = await unless_disconnected(request, _embed(engine, body))
    if body.encoding_format == "base64":
        raw = result.vectors.numpy().astype("<f4")
        data = [
            Embedding(index=i, embedding=base64.b64encode(row.tobytes()).decode("ascii"))
            for i, row in enumerate(raw)
        ]
    else:
        data = [Embedding(index=i, embedding=row) for i, row in enumerate(result.vectors.tolist())]
    tokens = result.total_tokens
    return json_response(
        EmbeddingResponse(
            data=data,
            model=engine.name,
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )
    )
