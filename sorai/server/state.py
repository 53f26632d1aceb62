"""What every handler needs: the engine, the server's settings and its metrics."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from sorai import hub
from sorai.server.auth import APIKeys
from sorai.server.body import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_FILE_BYTES
from sorai.server.errors import APIError
from sorai.server.lifecycle import Running
from sorai.server.logprobs import TokenText
from sorai.server.metrics import ServerMetrics
from sorai.vision.sources import MediaPolicy

if TYPE_CHECKING:
    import torch

    from sorai.engine.adapters import AdapterRegistry
    from sorai.engine.async_engine import AsyncEngine
    from sorai.engine.embeddings import EmbeddingEngine
    from sorai.engine.params import SamplingParams


@dataclass
class ServerSettings:
    # Names clients may send as `model` (besides the engine's own name); the first is the one
    # /v1/models lists first.
    served_model_names: tuple[str, ...] = ()
    # A ModelPool (server/models.py): the models served beside the engine (`-m A -m B`).
    models: Any = None
    api_keys: APIKeys = field(default_factory=APIKeys)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Seconds in-flight requests get to finish at shutdown before they are aborted.
    shutdown_timeout: float = 10.0
    # Seconds one request may run (queueing included) before it is stopped; None: no limit.
    request_timeout: float | None = None
    # What /v1/embeddings serves: a known embedding model or a sentence-transformers directory,
    # loaded on the first embeddings request; None serves none.
    embedding_model: str | None = hub.DEFAULT_EMBEDDING_MODEL
    embedding_device: str | torch.device | None = None  # default: the GPU if any, else the CPU
    # Where image parts may come from and how large they may be (sorai/vision/sources.py).
    media: MediaPolicy = field(default_factory=MediaPolicy)
    # Every PEFT adapter under this directory is served as BASE+NAME, picked up when it
    # appears (rescanned every adapter_scan_interval seconds and on a request naming an
    # unknown adapter).
    adapter_dir: Path | None = None
    adapter_scan_interval: float = 10.0
    # Where stored responses, uploaded files and batches are kept; None: $SORAI_HOME/server.
    data_dir: Path | None = None
    # POST /v1/files' body limit, and how many lines of one batch run at once (few: they run
    # at batch priority, but each running line still takes a slot and compute from others).
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    batch_concurrency: int = 4

    def data_path(self) -> Path:
        return self.data_dir if self.data_dir is not None else hub.sorai_home() / "server"


class ServerState:
    def __init__(
        self,
        engine: AsyncEngine,
        settings: ServerSettings,
        embeddings: EmbeddingEngine | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.embeddings = embeddings
        self.metrics = ServerMetrics(engine.stats)
        self.running = Running()
        self.token_text = TokenText(engine.tokenizer)
        self.created = int(time.time())
        names = list(settings.served_model_names) or [engine.model_name]
        self.model_names: tuple[str, ...] = tuple(dict.fromkeys(names))
        self._accepted = frozenset(self.model_names) | {engine.model_name}
        self.models = settings.models
        # The engine's LoRA adapters (sorai.engine.adapters); None for an engine without.
        self.adapters: AdapterRegistry | None = getattr(engine, "adapters", None)

    def serves(self, name: str) -> bool:
        """Whether `name` is one of the names of the first model (ServerState.engine)."""
        return name in self._accepted

    def adapter_of(self, model: str) -> str | None:
        """The adapter a resolved model name runs (`BASE+NAME`), or None for a base model."""
        if model in self._accepted or self.adapters is None:
            return None
        return model.rpartition("+")[2]

    def with_adapter(self, params: SamplingParams, model: str) -> SamplingParams:
        """`params` under the adapter the resolved model name runs, if any."""
        adapter = self.adapter_of(model)
        return params if adapter is None else dataclasses.replace(params, adapter=adapter)

    def is_adapter(self, requested: str) -> bool:
        """Whether `requested` is `BASE+NAME` for an adapter of the first model (an unknown
        NAME rescans --adapter-dir first)."""
        base, plus, name = requested.rpartition("+")
        if not plus or base not in self._accepted or self.adapters is None:
            return False
        if name not in self.adapters and self.settings.adapter_dir is not None:
            from sorai.server.adapters import scan_adapter_dir

            scan_adapter_dir(self.adapters, self.settings.adapter_dir)
        return name in self.adapters

    def resolve_model(self, requested: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if not requested:
            return self.model_names[0]
        if requested not in self._accepted and self.is_adapter(requested):
            return requested
        if self.embeddings is not None and requested == self.embeddings.name:
            raise APIError(
                404,
                f"{requested!r} is an embedding model: use it with POST /v1/embeddings; "
                "this server's chat model is " + repr(self.model_names[0]),
                param="model",
                code="model_not_found",
            )
        if requested not in self._accepted:
            loaded = self.adapters.names() if self.adapters is not None else {}
            adapters = [f"{self.model_names[0]}+{n}" for n in loaded]
            raise APIError(
                404,
                f"the model {requested!r} does not exist; this server serves "
                + ", ".join(repr(n) for n in (*self.model_names, *adapters)),
                param="model",
                code="model_not_found",
            )
        return requested


def get_state(request: Request) -> ServerState:
    return request.app.state.sorai
