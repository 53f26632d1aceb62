"""The Responses API's hosted tools through the official openai client, against a live server
on the real default model and encoder with the hosted tools installed: file_search over a
vector store built from uploaded files, code_interpreter in the python sandbox."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from sorai import hosted_tools, hub
from sorai.engine.llm import LLM
from sorai.hosted_tools.code_interpreter import CodeInterpreter
from sorai.server.app import create_app
from sorai.server.auth import APIKeys
from sorai.server.responses_api.hosted import HostedContext
from sorai.server.state import ServerSettings
from tests.server.conftest import API_KEY, Served
from tests.server.harness import ServerThread

CARS = "The Zephyr 9 is an electric car. The Zephyr 9 has a top speed of 240 km/h.\n"
TEA = "Sencha is a Japanese green tea. Most sencha is grown in Shizuoka prefecture.\n"


@pytest.fixture(scope="module")
def served(
    default_llm: LLM, default_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    from sorai.engine.async_engine import AsyncEngine
    from sorai.engine.llm_engine import LLMEngine

    engine = AsyncEngine(
        LLMEngine(default_llm.model, default_llm.tokenizer, name=hub.DEFAULT_MODEL)
    )
    settings = ServerSettings(
        api_keys=APIKeys([API_KEY]),
        embedding_model=hub.DEFAULT_EMBEDDING_MODEL,
        data_dir=tmp_path_factory.mktemp("server-data"),
    )
    app = hosted_tools.install(create_app(engine, settings))
    thread = ServerThread(app).start()
    yield Served(engine, thread)
    thread.stop()


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return served.client()


def test_file_search_cites_the_file_that_answers(client: openai.OpenAI) -> None:
    cars = client.files.create(file=("cars.txt", CARS.encode()), purpose="assistants")
    tea = client.files.create(file=("tea.txt", TEA.encode()), purpose="assistants")
    store = client.vector_stores.create(name="docs", file_ids=[cars.id, tea.id])
    assert store.file_counts.completed == 2
    response = client.responses.create(
        model=hub.DEFAULT_MODEL,
        input="What is the top speed of the Zephyr 9 car?",
        tools=[{"type": "file_search", "vector_store_ids": [store.id]}],
        tool_choice={"type": "file_search"},  # type: ignore[typeddict-item]
        max_output_tokens=24,
        temperature=0,
    )
    search = next(item for item in response.output if item.type == "file_search_call")
    assert search.results[0].file_id == cars.id, search.queries
    assert "240" in search.results[0].text
    message = next(item for item in response.output if item.type == "message")
    citations = message.content[0].annotations
    assert citations[0].type == "file_citation" and citations[0].file_id == cars.id
    assert citations[0].filename == "cars.txt"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(
            model=hub.DEFAULT_MODEL,
            input="hi",
            tools=[{"type": "file_search", "vector_store_ids": ["vs_nope"]}],
        )


@pytest.mark.slow  # the sandbox's fast-tier case is the workspace test below
def test_code_interpreter_runs_the_models_code(served: Served, client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=hub.DEFAULT_MODEL,
        input="Use python to print the result of 1234 * 5678.",
        tools=[{"type": "code_interpreter", "container": {"type": "auto"}}],
        tool_choice={"type": "code_interpreter"},  # type: ignore[typeddict-item]
        max_output_tokens=40,
        temperature=0,
    )
    call = next(item for item in response.output if item.type == "code_interpreter_call")
    assert call.code and call.container_id == response.id
    # What the model wrote ran in the sandbox: running it again prints the same.
    tool = CodeInterpreter()
    app = served.thread.server.config.app
    again = asyncio.run(tool.run({}, {"code": call.code}, HostedContext(app, "check", "")))
    assert call.outputs[0].logs == again.item["outputs"][0]["logs"]


def test_a_conversation_keeps_its_workspace(served: Served) -> None:
    tool = CodeInterpreter()
    app = served.thread.server.config.app

    a, b = HostedContext(app, "conv-a", ""), HostedContext(app, "conv-b", "")

    async def two_runs() -> tuple[str, str]:
        await tool.run({}, {"code": "open('n.txt', 'w').write(str(6 * 7))"}, a)
        same = await tool.run({}, {"code": "print(open('n.txt').read())"}, a)
        other = await tool.run({}, {"code": "import os; print(os.path.exists('n.txt'))"}, b)
        return same.item["outputs"][0]["logs"], other.item["outputs"][0]["logs"]

    same, other = asyncio.run(two_runs())
    assert same.strip() == "42" and other.strip() == "False"
