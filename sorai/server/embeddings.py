"""POST /v1/embeddings: a sentence-transformers model served next to the chat model.

The embedding model is loaded on the first embeddings request (so `sorai serve` starts as fast
without it) and runs on one worker thread of its own, one batch at a time: the event loop, and
so the chat streams, never wait for it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from sorai import hub
from sorai.errors import SoraiError
from sorai.server.body import read_json
from sorai.server.errors import SERVER_ERROR, APIError, bad_request
from sorai.server.protocol import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from sorai.server.responses import json_response
from sorai.server.runner import unless_disconnected
from sorai.server.state import get_state

if TYPE_CHECKING:
    import torch

    from sorai.model.bert import SentenceEncoder

log = logging.getLogger("sorai.server")
T = TypeVar("T")

router = APIRouter()


class EmbeddingModel:
    """The server's embedding model: `name` (a known model or a path, as the user gave it),
    loaded on first use and run on one worker thread."""

    def __init__(self, name: str, device: str | torch.device | None = None) -> None:
        self.name = name
        self._device = device
        self._encoder: SentenceEncoder | None = None
        self._max_seq_length: int | None = None
        self._load_lock = threading.Lock()
        # One worker: batches run one at a time, in arrival order, off the event loop.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sorai-embeddings")

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    @property
    def max_seq_length(self) -> int | None:
        """The model's input limit when its files are at hand (nothing is pulled for it)."""
        if self._max_seq_length is None:
            from sorai.model.bert import SentenceEncoderConfig

            source = hub.KNOWN_MODELS.get(self.name)
            # Only small JSON files are read (no checksum): this runs on the event loop.
            if source is not None:
                path = hub.model_dir(self.name) / source.filename
            else:
                path = Path(self.name).expanduser()
            with contextlib.suppress(SoraiError, OSError):
                self._max_seq_length = SentenceEncoderConfig.from_dir(path).max_seq_length
        return self._max_seq_length

    async def run(self, fn: Callable[[SentenceEncoder], T]) -> T:
        """fn(encoder) on the worker thread, loading the model first if needed."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self._call, fn)

    def _call(self, fn: Callable[[SentenceEncoder], T]) -> T:
        return fn(self.encoder())

    def encoder(self) -> SentenceEncoder:
        """The loaded model (loading it now, pulling a known model on first use)."""
        with self._load_lock:
            if self._encoder is None:
                from sorai.model.bert import SentenceEncoder

                log.info("loading embedding model %s", self.name)
                path = hub.resolve(self.name, progress=log.info)
                self._encoder = SentenceEncoder.from_dir(path, device=self._device)
                self._max_seq_length = self._encoder.max_seq_length
            return self._encoder

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def check_embedding_model(name: str) -> None:
    """Fail fast (SoraiError) on an embedding model argument that cannot work: a chat model's
    name, or a path that is not a sentence-transformers directory. Nothing is pulled."""
    kind = hub.kind_of(name)
    if kind == hub.EMBEDDING:
        return
    if kind is not None:
        raise SoraiError(
            f"{name!r} is a {kind} model, not an embedding model; known embedding models: "
            + ", ".join(n for n, s in sorted(hub.KNOWN_MODELS.items()) if s.kind == hub.EMBEDDING)
        )
    path = Path(os.path.expanduser(name))
    if not path.exists():
        raise SoraiError(
            f"embedding model {name!r} is neither a known embedding model nor a path to a "
            "sentence-transformers directory"
        )
    from sorai.model.bert import SentenceEncoderConfig

    SentenceEncoderConfig.from_dir(path)


def _model_not_found(message: str) -> APIError:
    return APIError(404, message, param="model", code="model_not_found")


def _embedding_model(request: Request, requested: str | None) -> EmbeddingModel:
    state = get_state(request)
    model = state.embeddings
    if model is None:
        raise _model_not_found(
            "this server serves no embedding model (it was started with --embedding-model "
            "none); start it with --embedding-model NAME_OR_PATH to serve one"
        )
    if requested is None or requested == model.name:
        return model
    if requested in state.model_names or requested == state.engine.model_name:
        raise _model_not_found(
            f"{requested!r} is a chat model and makes no embeddings; this server's embedding "
            f"model is {model.name!r}"
        )
    raise _model_not_found(
        f"the model {requested!r} does not exist; this server's embedding model is {model.name!r}"
    )


def _embed(
    encoder: SentenceEncoder, inputs: list[str] | list[list[int]]
) -> tuple[torch.Tensor, int]:
    """Vectors of the inputs and the tokens they took (after truncation)."""
    if isinstance(inputs[0], str):
        ids = encoder.tokenize(inputs)  # type: ignore[arg-type]
    else:
        ids = [seq[: encoder.max_seq_length] for seq in inputs]  # type: ignore[misc]
        vocab = encoder.vocab_size
        for i, seq in enumerate(ids):
            bad = next((t for t in seq if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(f"input[{i}]: token ids must be in [0, {vocab}), got {bad}")
    return encoder.encode_ids(ids), sum(len(seq) for seq in ids)


@router.post("/v1/embeddings")
async def create_embeddings(request: Request) -> Response:
    body = await read_json(request, EmbeddingRequest)
    model = _embedding_model(request, body.model)
    inputs = body.inputs()

    def embed(encoder: SentenceEncoder) -> tuple[torch.Tensor, int]:
        if body.dimensions is not None and body.dimensions != encoder.dimension:
            raise bad_request(
                f"dimensions is not supported by {model.name!r}: its embeddings have "
                f"{encoder.dimension} dimensions, got {body.dimensions}",
                param="dimensions",
            )
        return _embed(encoder, inputs)

    try:
        # A request whose client has gone is dropped from the worker's queue.
        vectors, tokens = await unless_disconnected(request, model.run(embed))
    except APIError:
        raise
    except (SoraiError, OSError) as e:
        # The request was fine; the server's model is not (a failed pull, a bad directory).
        log.error("embedding model %s could not be loaded: %s", model.name, e)
        raise APIError(
            503,
            f"the embedding model {model.name!r} could not be loaded: {e}",
            type=SERVER_ERROR,
            code="model_unavailable",
        ) from None
    if body.encoding_format == "base64":
        raw = vectors.numpy().astype("<f4")
        data = [
            Embedding(index=i, embedding=base64.b64encode(row.tobytes()).decode("ascii"))
            for i, row in enumerate(raw)
        ]
    else:
        data = [Embedding(index=i, embedding=row) for i, row in enumerate(vectors.tolist())]
    return json_response(
        EmbeddingResponse(
            data=data,
            model=model.name,
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )
    )
