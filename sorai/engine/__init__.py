"""The inference engine: continuous batching over a paged, prefix-cached KV cache."""

from sorai.engine.async_engine import AsyncEngine
from sorai.engine.config import EngineConfig
from sorai.engine.embeddings import EmbeddingEngine, Embeddings
from sorai.engine.llm_engine import LLMEngine
from sorai.engine.outputs import ChoiceDelta, EngineStats, RequestOutput, TokenLogprob

__all__ = [
    "AsyncEngine",
    "ChoiceDelta",
    "EmbeddingEngine",
    "Embeddings",
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "RequestOutput",
    "TokenLogprob",
]
