"""Shared fixtures: the embedded default models (chat and embeddings), pulled once into the
test cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from sorai import hub


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The embedded default model's .gguf file (pulled into $SORAI_HOME on first use)."""
    return hub.resolve(hub.DEFAULT_MODEL, progress=print)


@pytest.fixture(scope="session")
def default_encoder_dir() -> Path:
    """The default embedding model's sentence-transformers directory (pulled on first use)."""
    return hub.resolve(hub.DEFAULT_EMBEDDING_MODEL, progress=print)
