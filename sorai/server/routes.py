"""The small endpoints: /v1/models, /health, /metrics, /tokenize, /detokenize."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sorai.server.body import read_json
from sorai.server.errors import bad_request, engine_unavailable
from sorai.server.metrics import CONTENT_TYPE
from sorai.server.models import route
from sorai.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from sorai.server.responses import json_response
from sorai.server.state import ServerState, get_state
from sorai.server.tools import ToolSetup

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    state = get_state(request)
    cards = [_chat_card(state, name) for name in state.model_names]
    if state.adapters is not None:
        base = state.model_names[0]
        for name, path in state.adapters.names().items():
            card = _chat_card(state, f"{base}+{name}")
            card.parent, card.root = base, str(path)
            cards.append(card)
    if state.models is not None:  # -m A -m B: the others loaded, then those loadable
        cards += [_chat_card(state, name, m.engine) for name, m in state.models.loaded.items()]
        listed = {card.id for card in cards} | {state.engine.model_name}
        cards += [_cached_card(state, n) for n in state.models.cached() if n not in listed]
    if state.embeddings is not None:
        cards.append(_embedding_card(state))
    return json_response(ModelList(data=cards))


@router.get("/v1/models/{model:path}")
async def get_model(request: Request, model: str) -> Response:
    state = get_state(request)
    if state.embeddings is not None and model == state.embeddings.name:
        return json_response(_embedding_card(state))
    if state.models is not None and not state.serves(model):
        if (loaded := state.models.loaded.get(model)) is not None:
            return json_response(_chat_card(state, model, loaded.engine))
        if model in state.models.cached():
            return json_response(_cached_card(state, model))
    name = state.resolve_model(model)
    return json_response(_chat_card(state, name))


def _chat_card(state: ServerState, name: str, engine=None) -> ModelCard:
    engine = engine or state.engine
    return ModelCard(
        id=name,
        created=state.created,
        max_model_len=engine.context_length,
        runtime=engine.runtime.as_dict(),
        input_modalities=(
            ["text", "image"] if getattr(engine, "image_encoder", None) is not None else None
        ),
    )


def _cached_card(state: ServerState, name: str) -> ModelCard:
    return ModelCard(id=name, created=state.created, max_model_len=None, loaded=False)


def _embedding_card(state: ServerState) -> ModelCard:
    assert state.embeddings is not None
    return ModelCard(
        id=state.embeddings.name,
        created=state.created,
        max_model_len=state.embeddings.max_seq_length,
    )


@router.get("/health")
async def health(request: Request) -> Response:
    if get_state(request).engine.dead:
        return engine_unavailable().response()
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE)


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    state = get_state(request)
    body = await read_json(request, TokenizeRequest)
    state, _ = await route(request, body.model)
    tokenizer = state.engine.tokenizer
    if body.messages is not None:
        # Chat templates write their own BOS, so no special tokens are added by default.
        text = ToolSetup().render(tokenizer, body.messages, body.add_generation_prompt)
        add_special = bool(body.add_special_tokens)
    else:
        text = body.prompt or ""
        add_special = body.add_special_tokens is not False
    tokens = tokenizer.encode(text, add_special_tokens=add_special)
    return json_response(
        TokenizeResponse(
            tokens=tokens, count=len(tokens), max_model_len=state.engine.context_length
        )
    )


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    state = get_state(request)
    body = await read_json(request, DetokenizeRequest)
    state, _ = await route(request, body.model)
    vocab = state.engine.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"token ids must be in [0, {vocab}), got {bad}", "tokens")
    return json_response(DetokenizeResponse(prompt=state.engine.tokenizer.decode(body.tokens)))
