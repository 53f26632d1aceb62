from __future__ import annotations

from collections.abc import Iterator

import pytest

from sorai.apps.client import Client


@pytest.fixture(scope="session")
def client(default_gguf) -> Iterator[Client]:
    """The embedded default model (and the embedding model) behind sorai's own server, in this
    process: one per test session for every app's tests."""
    client = Client.local()
    yield client
    client.close()
