"""Shared fixtures: the embedded default models (chat and embeddings), pulled once into the
test cache, the default chat model loaded once, and an environment that names no endpoint."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import sorai
from sorai import hub

if TYPE_CHECKING:
    from sorai.engine.llm import LLM

# What the apps' endpoint discovery reads (sorai.apps.client.find_endpoint): a developer's own
# endpoint, key or `sorai serve` on the default port must not change what the tests talk to.
ENDPOINT_VARIABLES = ("SORAI_URL", "OPENAI_BASE_URL", "SORAI_API_KEY", "OPENAI_API_KEY")


@pytest.fixture(scope="session", autouse=True)
def no_endpoint_from_the_environment() -> Iterator[None]:
    """For the session, in this process and the subprocesses it starts: no endpoint or key in
    the environment and no probe of the default port; a test wanting one sets it itself."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ENDPOINT_VARIABLES:
            patch.delenv(name, raising=False)
        patch.setenv("SORAI_DEFAULT_URL", "none")
        yield


@pytest.fixture(scope="session", autouse=True)
def registry_of_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Runs trained and models pulled by the tests are registered in a registry of the
    session's own (here and in subprocesses), never in the developer's (`sorai ls`)."""
    path = tmp_path_factory.mktemp("registry") / "registry.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SORAI_REGISTRY", str(path))
        yield


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The embedded default model's .gguf file (pulled into $SORAI_HOME on first use)."""
    return hub.resolve(hub.DEFAULT_MODEL, progress=print)


@pytest.fixture(scope="session")
def default_encoder_dir() -> Path:
    """The default embedding model's sentence-transformers directory (pulled on first use)."""
    return hub.resolve(hub.DEFAULT_EMBEDDING_MODEL, progress=print)


@pytest.fixture(scope="session")
def default_llm(default_gguf: Path) -> LLM:
    """The default model loaded once per session, shared by every test that only generates
    from it. A test that changes the model (an adapter, its weights or dtype) loads its own;
    one that needs other engine settings builds `LLM(LLMEngine(llm.model, llm.tokenizer,
    EngineConfig(...)))` over these same weights."""
    return sorai.load(default_gguf)


@pytest.fixture
def sorai_main(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`sorai ARGS` run in this process by sorai.cli.main, returning the exit code, stdout and
    stderr a subprocess would give, without a new interpreter's start-up (seconds of imports).
    stdin: the text piped to it (not a terminal); env: variables set for the rest of the test.
    The real console script keeps its own tests (tests/test_cli.py, test_serve_cli.py)."""
    from sorai.cli import main

    def run(
        *args: str, stdin: str = "", env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()  # what the test printed before is not this command's output
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse: --version, usage errors
            code = 0 if exit.code is None else exit.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["sorai", *args], code, out, err)

    return run
