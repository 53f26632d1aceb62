"""The inference engine: continuous batching over a paged, prefix-cached KV cache.

The names below load on first use, so a light module (`sorai.engine.params`, which the CLI
reads to check flags before anything loads) does not pull in torch with the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sorai.engine.async_engine import AsyncEngine
    from sorai.engine.config import EngineConfig
    from sorai.engine.embeddings import EmbeddingEngine, Embeddings
    from sorai.engine.llm import LLM, Completion
    from sorai.engine.llm_engine import LLMEngine
    from sorai.engine.outputs import ChoiceDelta, EngineStats, RequestOutput, TokenLogprob

_WHERE = {
    "AsyncEngine": "async_engine",
    "ChoiceDelta": "outputs",
    "Completion": "llm",
    "EmbeddingEngine": "embeddings",
    "Embeddings": "embeddings",
    "EngineConfig": "config",
    "EngineStats": "outputs",
    "LLM": "llm",
    "LLMEngine": "llm_engine",
    "RequestOutput": "outputs",
    "TokenLogprob": "outputs",
}

__all__ = [
    "LLM",
    "AsyncEngine",
    "ChoiceDelta",
    "Completion",
    "EmbeddingEngine",
    "Embeddings",
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "RequestOutput",
    "TokenLogprob",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'sorai.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sorai.engine.{module}"), name)
