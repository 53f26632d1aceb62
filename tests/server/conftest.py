"""Servers for the API tests: real uvicorn on a free loopback port, in a background thread.

`live` serves the real default model through the real AsyncEngine (once per session, over the
session's loaded weights), and the default embedding model next to it;
`fake` serves a scripted FakeEngine that can be told to refuse or abort requests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from fastapi import FastAPI

from sorai import hub
from sorai.engine.llm import LLM
from sorai.model.gguf import GGUFFile
from sorai.model.tokenizer import Tokenizer
from sorai.server.app import create_app
from sorai.server.auth import APIKeys
from sorai.server.state import ServerSettings
from tests.server.fake_engine import FakeEngine
from tests.server.harness import ServerThread

API_KEY = "sk-test-0123456789"


class Served:
    def __init__(self, engine, thread: ServerThread) -> None:
        self.engine = engine
        self.thread = thread
        self.url = thread.url
        self.model = engine.model_name

    def client(self, api_key: str = API_KEY, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **options)

    def async_client(self, api_key: str = API_KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0)

    @property
    def state(self):
        """The app's ServerState (the server runs in this process)."""
        return self.thread.server.config.app.state.sorai

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def tokenizer(default_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(GGUFFile(default_gguf).metadata)


@pytest.fixture(scope="module")
def fake(tokenizer: Tokenizer) -> Iterator[Served]:
    engine = FakeEngine(tokenizer)
    settings = ServerSettings(
        served_model_names=("fake-model", "fake-alias"),
        api_keys=APIKeys([API_KEY, "second-key"]),
        max_body_bytes=64 * 1024,
        embedding_model=None,  # a chat-only server (tests/server/test_embeddings.py uses that)
    )
    thread = ServerThread(create_app(engine, settings)).start()
    yield Served(engine, thread)
    thread.stop()


@pytest.fixture
def fake_engine(fake: Served) -> Iterator[FakeEngine]:
    """The fake server's engine, reset to answer normally after each test."""
    yield fake.engine
    engine = fake.engine
    engine.dead, engine.refuse, engine.abort_after, engine.step_delay = False, None, None, 0.0


@pytest.fixture(scope="session")
def live(default_llm: LLM, default_encoder_dir: Path) -> Iterator[Served]:
    """The default chat model (the session's weights, tests/conftest.py, under its own engine
    and its name) and, loaded on the first embeddings request, the default embedding model."""
    settings = ServerSettings(
        api_keys=APIKeys([API_KEY]), embedding_model=hub.DEFAULT_EMBEDDING_MODEL
    )
    served = serve_default(default_llm, settings)
    yield served
    served.thread.stop()


def serve_default(
    llm: LLM, settings: ServerSettings, extend: Callable[[FastAPI], FastAPI] | None = None
) -> Served:
    """A server on 127.0.0.1 of the default model's loaded weights (`llm`) under an engine of
    its own, named as the hub names it; `extend` adds routes from above the server (the hosted
    tools, the console). The caller stops its thread."""
    from sorai.engine.async_engine import AsyncEngine
    from sorai.engine.llm_engine import LLMEngine

    engine = AsyncEngine(LLMEngine(llm.model, llm.tokenizer, name=hub.DEFAULT_MODEL))
    app = create_app(engine, settings)
    thread = ServerThread(extend(app) if extend is not None else app).start()
    return Served(engine, thread)
