"""POST /v1/responses and the stored responses, driven by the official openai client against a
live server on the real default model (one server per module, its own data directory)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from sorai import hub
from sorai.engine.llm import LLM
from sorai.server.app import create_app
from sorai.server.auth import APIKeys
from sorai.server.state import ServerSettings
from tests.server.conftest import API_KEY, Served
from tests.server.harness import ServerThread

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def _serve(llm: LLM, data_dir: Path) -> Served:
    from sorai.engine.async_engine import AsyncEngine
    from sorai.engine.llm_engine import LLMEngine

    engine = AsyncEngine(LLMEngine(llm.model, llm.tokenizer, name=hub.DEFAULT_MODEL))
    settings = ServerSettings(api_keys=APIKeys([API_KEY]), embedding_model=None, data_dir=data_dir)
    return Served(engine, ServerThread(create_app(engine, settings)).start())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-data")


@pytest.fixture(scope="module")
def served(default_llm: LLM, data_dir: Path) -> Iterator[Served]:
    server = _serve(default_llm, data_dir)
    yield server
    server.thread.stop()


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return served.client()


def test_plain_response_is_stored_listed_and_deleted(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=hub.DEFAULT_MODEL,
        instructions="You are terse.",
        input="Name a colour.",
        max_output_tokens=6,
        temperature=0,
    )
    assert response.object == "response"
    assert response.status in ("completed", "incomplete")
    assert response.output_text
    assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 6
    again = client.responses.retrieve(response.id)
    assert again.output_text == response.output_text
    items = client.responses.input_items.list(response.id)
    assert [item.type for item in items.data] == ["message"]
    assert items.data[0].content[0].text == "Name a colour."
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_streamed_response_matches_the_stored_one(client: openai.OpenAI) -> None:
    deltas = []
    kinds = []
    final = None
    # Not get_final_response(): the client knows only response.completed, and a response cut
    # at max_output_tokens ends with response.incomplete, as OpenAI's do.
    with client.responses.stream(
        model=hub.DEFAULT_MODEL, input="Count: one, two,", max_output_tokens=8, temperature=0
    ) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            final = getattr(event, "response", None) or final
    assert kinds[0] == "response.created"
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_item.added" in kinds and "response.output_text.done" in kinds
    assert "".join(deltas) == final.output_text
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_json_schema_format_is_followed(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model=hub.DEFAULT_MODEL,
        input="Describe a person as JSON.",
        text={"format": {"type": "json_schema", "name": "person", "schema": schema}},
        max_output_tokens=40,
        temperature=0,
    )
    person = json.loads(response.output_text)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)


def test_function_tool_round_trip_via_previous_response_id(client: openai.OpenAI) -> None:
    # Streamed: the call's arguments arrive as response.function_call_arguments.delta events.
    events = list(
        client.responses.create(
            model=hub.DEFAULT_MODEL,
            input="What is the weather in Paris?",
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "name": "get_weather"},
            max_output_tokens=30,
            temperature=0,
            stream=True,
        )
    )
    assert events[-1].type == "response.completed"
    first = events[-1].response
    streamed = "".join(
        e.delta for e in events if e.type == "response.function_call_arguments.delta"
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert streamed == calls[0].arguments
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    second = client.responses.create(
        model=hub.DEFAULT_MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_output_tokens=6,
        temperature=0,
    )
    assert second.previous_response_id == first.id
    assert second.output_text
    # The stored conversation (question, call, result) is in the second prompt: it is longer
    # than the question alone under the same tool settings.
    alone = client.responses.create(
        model=hub.DEFAULT_MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_output_tokens=1,
        store=False,
    )
    assert second.usage.input_tokens > alone.usage.input_tokens
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(alone.id)  # store: false


def test_errors_are_openai_shaped(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(
            model=hub.DEFAULT_MODEL, input="hi", previous_response_id="resp_nope"
        )
    assert missing.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model=hub.DEFAULT_MODEL, input=[{"type": "reasoning"}])
    assert "input[0]" in bad.value.body["message"]


def test_a_restarted_server_keeps_stored_responses(default_llm: LLM, tmp_path: Path) -> None:
    server = _serve(default_llm, tmp_path)
    try:
        made = server.client().responses.create(
            model=hub.DEFAULT_MODEL, input="Hello", max_output_tokens=3, temperature=0
        )
    finally:
        server.thread.stop()
    again = _serve(default_llm, tmp_path)
    try:
        kept = again.client().responses.retrieve(made.id)
    finally:
        again.thread.stop()
    assert kept.output_text == made.output_text
