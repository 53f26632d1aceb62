"""The Responses API's hosted tools through the official openai client, against a live server
on the real default model and encoder with the hosted tools installed: file_search over a
vector store built from uploaded files, code_interpreter in the python sandbox."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from sorai import hosted_tools, hub
from sorai.engine.llm import LLM
from sorai.hosted_tools.code_interpreter import CodeInterpreter
from sorai.server.auth import APIKeys
from sorai.server.errors import APIError
from sorai.server.responses_api import items
from sorai.server.responses_api.hosted import HostedContext
from sorai.server.state import ServerSettings
from tests.server.conftest import API_KEY, Served, serve_default

CARS = "The Zephyr 9 is an electric car. The Zephyr 9 has a top speed of 240 km/h.\n"
TEA = "Sencha is a Japanese green tea. Most sencha is grown in Shizuoka prefecture.\n"


@pytest.fixture(scope="module")
def served(
    default_llm: LLM, default_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    settings = ServerSettings(
        api_keys=APIKeys([API_KEY]),
        embedding_model=hub.DEFAULT_EMBEDDING_MODEL,
        data_dir=tmp_path_factory.mktemp("server-data"),
    )
    served = serve_default(default_llm, settings, hosted_tools.install)
    yield served
    served.thread.stop()


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return served.client()


QUESTION = "What is the top speed of the Zephyr 9 car?"


@dataclass
class Searched:
    """One streamed file_search response over a store created just before it (still being
    indexed when the response was asked for)."""

    store: Any  # the store as its creation answered it
    cars: str  # the file ids
    tea: str
    events: list[Any]  # the stream's events, in order
    response: Any  # the stream's final response


@pytest.fixture(scope="module")
def searched(client: openai.OpenAI) -> Searched:
    cars = client.files.create(file=("cars.txt", CARS.encode()), purpose="assistants")
    tea = client.files.create(file=("tea.txt", TEA.encode()), purpose="assistants")
    store = client.vector_stores.create(name="docs", file_ids=[cars.id, tea.id])
    with client.responses.stream(
        model=hub.DEFAULT_MODEL,
        input=QUESTION,
        tools=[{"type": "file_search", "vector_store_ids": [store.id]}],
        tool_choice={"type": "file_search"},  # type: ignore[typeddict-item]
        max_output_tokens=24,
        temperature=0,
    ) as stream:
        events = list(stream)
    # response.completed, or response.incomplete where the answer ran into max_output_tokens
    return Searched(store, cars.id, tea.id, events, events[-1].response)


def test_vector_store_is_built_in_the_background(client: openai.OpenAI, searched: Searched) -> None:
    # Answered at once, before its files were indexed; a search waited for them.
    assert searched.store.status == "in_progress"
    assert searched.store.file_counts.in_progress == 2
    store = client.vector_stores.retrieve(searched.store.id)
    assert store.status == "completed" and store.file_counts.completed == 2
    assert client.vector_stores.files.retrieve(searched.cars, vector_store_id=store.id).status == (
        "completed"
    )


def test_stores_and_their_files_list_in_openai_pages(
    client: openai.OpenAI, searched: Searched
) -> None:
    assert searched.store.id in [s.id for s in client.vector_stores.list()]
    files = client.vector_stores.files.list(vector_store_id=searched.store.id)
    assert sorted(f.id for f in files) == sorted([searched.cars, searched.tea])
    first = client.vector_stores.files.list(vector_store_id=searched.store.id, limit=1)
    assert len(first.data) == 1 and first.has_more
    with pytest.raises(openai.BadRequestError, match="after"):
        client.vector_stores.list(after="vs_nope")


def test_file_search_cites_the_file_that_answers(client: openai.OpenAI, searched: Searched) -> None:
    response = searched.response
    search = next(item for item in response.output if item.type == "file_search_call")
    assert search.results[0].file_id == searched.cars, search.queries
    assert "240" in search.results[0].text
    message = next(item for item in response.output if item.type == "message")
    citations = message.content[0].annotations
    assert citations[0].type == "file_citation" and citations[0].file_id == searched.cars
    assert citations[0].filename == "cars.txt"
    assert client.responses.retrieve(response.id).output == response.output
    with pytest.raises(openai.NotFoundError):
        client.responses.create(
            model=hub.DEFAULT_MODEL,
            input="hi",
            tools=[{"type": "file_search", "vector_store_ids": ["vs_nope"]}],
        )


def test_file_search_streams_its_events_as_they_happen(searched: Searched) -> None:
    kinds = [event.type for event in searched.events]
    search = next(item for item in searched.response.output if item.type == "file_search_call")
    steps = [
        "response.created",
        "response.output_item.added",  # the call, in progress
        "response.file_search_call.in_progress",
        "response.file_search_call.searching",
        "response.file_search_call.completed",
        "response.output_item.done",
        "response.output_text.delta",  # the answer, token by token after the search
        searched.events[-1].type,  # response.completed (or incomplete)
    ]
    at = [kinds.index(step, kinds.index(steps[i - 1]) if i else 0) for i, step in enumerate(steps)]
    assert at == sorted(at), kinds
    added = searched.events[at[1]]
    assert added.item.type == "file_search_call" and added.item.id == search.id
    assert added.item.status == "in_progress"
    assert searched.events[at[2]].item_id == search.id
    assert kinds.count("response.output_text.delta") > 1  # streamed, not one piece at the end


def test_a_follow_up_shows_the_model_the_search(client: openai.OpenAI, searched: Searched) -> None:
    response = searched.response
    search = next(item for item in response.output if item.type == "file_search_call")
    answer = next(item for item in response.output if item.type == "message")
    passages = "\n\n".join(
        f"[{i + 1}] {hit.filename}: {hit.text}" for i, hit in enumerate(search.results)
    )
    call = {"name": "file_search", "arguments": json.dumps({"query": search.queries[-1]})}
    # The conversation as chat messages: the call the model made and the passages it read.
    expected = client.chat.completions.create(
        model=hub.DEFAULT_MODEL,
        messages=[
            {"role": "user", "content": QUESTION},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": search.id, "type": "function", "function": call}],
            },
            {"role": "tool", "tool_call_id": search.id, "content": passages},
            {"role": "assistant", "content": answer.content[0].text},
            {"role": "user", "content": "Thanks."},
        ],
        max_tokens=1,
    )
    stored = client.responses.create(
        model=hub.DEFAULT_MODEL,
        input="Thanks.",
        previous_response_id=response.id,
        max_output_tokens=1,
    )
    assert stored.usage.input_tokens == expected.usage.prompt_tokens
    # The same items sent back as input (no stored conversation) read the same.
    output = [item.model_dump(exclude_none=True) for item in response.output]
    sent = client.responses.create(
        model=hub.DEFAULT_MODEL,
        input=[
            {"role": "user", "content": QUESTION},
            *output,
            {"role": "user", "content": "Thanks."},
        ],
        max_output_tokens=1,
        store=False,
    )
    assert sent.usage.input_tokens == expected.usage.prompt_tokens


def test_a_code_interpreter_call_replays_as_its_code_and_logs() -> None:
    item = {
        "type": "code_interpreter_call",
        "id": "ci_1",
        "status": "completed",
        "code": "print(6 * 7)",
        "container_id": "resp_1",
        "outputs": [{"type": "logs", "logs": "42\n"}],
    }
    hosted = {"code_interpreter": CodeInterpreter()}
    messages = items.chat_messages([*items.input_items([item], hosted)], hosted)
    call = messages[0]["tool_calls"][0]
    assert call["id"] == "ci_1" and call["function"]["name"] == "code_interpreter"
    assert json.loads(call["function"]["arguments"]) == {"code": "print(6 * 7)"}
    assert messages[1] == {"role": "tool", "tool_call_id": "ci_1", "content": "42\n"}
    with pytest.raises(APIError):
        items.input_items([{**item, "outputs": "not a list"}], hosted)


def test_text_before_a_call_replays_as_one_assistant_turn() -> None:
    # A round that said something and then called a tool: one assistant message holding the
    # text and the call (was: two assistant messages in a row, which strict templates refuse).
    said = {"type": "message", "role": "assistant", "content": [{"text": "Let me run it."}]}
    call = {
        "type": "code_interpreter_call", "id": "ci_2", "status": "completed", "code": "1+1",
        "container_id": "resp_2", "outputs": [{"type": "logs", "logs": "2\n"}],
    }  # fmt: skip
    hosted = {"code_interpreter": CodeInterpreter()}
    messages = items.chat_messages([said, call], hosted)
    assert [m["role"] for m in messages] == ["assistant", "tool"]
    assert messages[0]["content"] == "Let me run it."
    assert messages[0]["tool_calls"][0]["id"] == "ci_2"


@pytest.mark.slow  # the sandbox's fast-tier case is the workspace test below
def test_code_interpreter_runs_the_models_code(served: Served, client: openai.OpenAI) -> None:
    with client.responses.stream(
        model=hub.DEFAULT_MODEL,
        input="Use python to print the result of 1234 * 5678.",
        tools=[{"type": "code_interpreter", "container": {"type": "auto"}}],
        tool_choice={"type": "code_interpreter"},  # type: ignore[typeddict-item]
        max_output_tokens=40,
        temperature=0,
    ) as stream:
        events = list(stream)
    response = events[-1].response
    call = next(item for item in response.output if item.type == "code_interpreter_call")
    assert call.code and call.container_id == response.id
    kinds = [e.type for e in events if getattr(e, "item_id", None) == call.id]
    assert kinds == [
        "response.code_interpreter_call.in_progress",
        "response.code_interpreter_call_code.delta",
        "response.code_interpreter_call_code.done",
        "response.code_interpreter_call.interpreting",
        "response.code_interpreter_call.completed",
    ]
    # What the model wrote ran in the sandbox: running it again prints the same.
    tool = CodeInterpreter()
    app = served.thread.server.config.app
    again = asyncio.run(tool.run({}, {"code": call.code}, HostedContext(app, "check", "")))
    assert call.outputs[0].logs == again.item["outputs"][0]["logs"]


def test_a_conversation_keeps_its_workspace(served: Served) -> None:
    tool = CodeInterpreter()
    app = served.thread.server.config.app

    a, b = HostedContext(app, "conv-a", ""), HostedContext(app, "conv-b", "")

    async def runs() -> tuple[str, str, dict]:
        await tool.run({}, {"code": "open('n.txt', 'w').write(str(6 * 7))"}, a)
        same = await tool.run({}, {"code": "print(open('n.txt').read())"}, a)
        other = await tool.run({}, {"code": "import os; print(os.path.exists('n.txt'))"}, b)
        failed = await tool.run({}, {"code": "import sys; sys.exit(3)"}, b)
        return same.item["outputs"][0]["logs"], other.item["outputs"][0]["logs"], failed.item

    same, other, failed = asyncio.run(runs())
    assert same.strip() == "42" and other.strip() == "False"
    # How a run ended is in its logs, for the client and for the model's next round.
    assert failed["status"] == "failed" and "[exit code 3]" in failed["outputs"][0]["logs"]
    assert "exit code 3" in tool.replay(failed)[1]


def test_a_streamed_response_with_hosted_tools_refuses_a_too_long_input_with_its_status(
    client: openai.OpenAI, searched: Searched
) -> None:
    # The first round starts before the stream's first byte: the 400 is the request's status,
    # not an error event after a 200 (as it was).
    with pytest.raises(openai.BadRequestError, match="context|tokens"):
        client.responses.create(
            model=hub.DEFAULT_MODEL,
            input="word " * 20000,
            tools=[{"type": "file_search", "vector_store_ids": [searched.store.id]}],
            stream=True,
        )
    assert client.models.list().data  # the server keeps serving
