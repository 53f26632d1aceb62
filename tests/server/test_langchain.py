"""LangChain's ChatOpenAI, an outside client, against the real default model through the server.

Tool calls forced by name, structured output by `json_schema` and by `function_calling`, and
streams, all with max_tokens of 32-64: each answer must come back as a parsed object, every
time. What makes that hold on a 135M model: closed tool arguments (no invented keys), and
output closed within its budget (finish_reason "stop", so the parsers accept it).
"""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import API_KEY, Served

langchain_openai = pytest.importorskip("langchain_openai")
langchain_tools = pytest.importorskip("langchain_core.tools")

QUESTION = "What time is it in Tokyo right now?"
# The tightest budget in the default tier, the others in `make test-all` (each case ~10 s).
BUDGETS = (32, pytest.param(48, marks=pytest.mark.slow), pytest.param(64, marks=pytest.mark.slow))


@langchain_tools.tool
def get_time(city: str) -> str:
    """Get the current time in a city."""
    return "12:00"


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(description="The person's name")
    age: int = Field(description="The person's age in years")


def model(live: Served, max_tokens: int, seed: int = 0, **options):
    return langchain_openai.ChatOpenAI(
        base_url=live.url + "/v1",
        api_key=API_KEY,
        model=live.model,
        max_tokens=max_tokens,
        temperature=1.0,
        seed=seed,
        max_retries=0,
        **options,
    )


@pytest.mark.parametrize("max_tokens", BUDGETS)
def test_bind_tools_with_a_named_tool_choice_gives_a_call(live: Served, max_tokens: int) -> None:
    for seed in range(2):
        bound = model(live, max_tokens, seed).bind_tools([get_time], tool_choice="get_time")
        reply = bound.invoke(QUESTION)
        (call,) = reply.tool_calls
        assert call["name"] == "get_time"
        assert set(call["args"]) == {"city"} and isinstance(call["args"]["city"], str)
        assert not reply.invalid_tool_calls


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
@pytest.mark.parametrize("max_tokens", BUDGETS)
def test_with_structured_output_gives_an_object(live: Served, method: str, max_tokens: int) -> None:
    text = "Alice is a 31 year old engineer from Osaka who likes long walks along the river."
    for seed in range(2):
        structured = model(live, max_tokens, seed).with_structured_output(Person, method=method)
        person = structured.invoke(f"Extract the person: {text}")
        assert isinstance(person, Person), person


@pytest.mark.parametrize("max_tokens", BUDGETS)
def test_streamed_tool_calls_and_structured_output_parse(live: Served, max_tokens: int) -> None:
    bound = model(live, max_tokens, streaming=True).bind_tools([get_time], tool_choice="get_time")
    chunks = list(bound.stream(QUESTION))
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    (call,) = whole.tool_calls
    assert call["name"] == "get_time" and set(call["args"]) == {"city"}
    structured = model(live, max_tokens, streaming=True).with_structured_output(
        Person, method="json_schema"
    )
    parts = list(structured.stream("Extract the person: Bob, 40, a baker."))
    assert parts and isinstance(parts[-1], Person), parts[-1:]
