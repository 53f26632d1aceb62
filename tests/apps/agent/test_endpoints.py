"""The `tools` strategy against replies shaped as OpenAI's API and other OpenAI-compatible
servers send them, from ScriptedModel (a test double for the LLM): parallel calls with
`content` null, arguments that are not JSON, a reply cut at max_tokens, text where a call was
required, and endpoints that refuse tool_choice "required" or a named function."""

from __future__ import annotations

import pytest

from sorai.apps.agent import Agent
from sorai.apps.client import ClientError
from tests.apps.agent.scripted import Calls, Raw, ScriptedModel


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def call(name: str, arguments: str, id: str) -> dict:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def agent(model: ScriptedModel, tmp_path, **kw) -> Agent:
    return Agent(model, tools=[add], strategy="tools", trace_dir=tmp_path, **kw)


def test_parallel_calls_with_null_content_each_get_their_tool_message(tmp_path):
    model = ScriptedModel(
        [
            Raw(
                {
                    "content": None,
                    "tool_calls": [
                        call("add", '{"a": 1, "b": 2}', "call_A"),
                        call("add", '{"a": 3, "b": 4}', "call_B"),
                    ],
                },
                "tool_calls",
            ),
            Calls([("final_answer", {"answer": "3 and 7"})]),
        ]
    )
    trace = agent(model, tmp_path).run("Add 1+2 and 3+4.")
    assert trace.answer == "3 and 7"
    assert [s.observation for s in trace.tool_calls] == ["3", "7"]
    sent = model.requests[1]["messages"]
    assert [m["tool_call_id"] for m in sent if m["role"] == "tool"] == ["call_A", "call_B"]
    assert [c["id"] for c in sent[-3]["tool_calls"]] == ["call_A", "call_B"]


def test_invalid_json_arguments_are_fed_back_and_a_cut_reply_says_so(tmp_path):
    model = ScriptedModel(
        [
            Raw({"content": None, "tool_calls": [call("add", '{"a": 1, "b"', "c1")]}, "length"),
            Raw({"content": None, "tool_calls": [call("add", "{a: 1}", "c2")]}, "tool_calls"),
            Calls([("add", {"a": 1, "b": 1})]),
            Calls([("final_answer", {"answer": "2"})]),
        ]
    )
    trace = agent(model, tmp_path, max_tokens=64).run("1+1?")
    errors = [s.observation for s in trace.steps if s.kind == "error"]
    assert len(errors) == 2 and all("not JSON" in e for e in errors)
    assert "cut off at max_tokens (64)" in errors[0] and "cut off" not in errors[1]
    assert trace.answer == "2" and trace.tool_calls[0].observation == "2"
    assert "That did not work" in model.requests[1]["messages"][-1]["content"]


def test_text_although_a_call_was_required_is_the_answer(tmp_path):
    model = ScriptedModel(["The answer is 4."])
    trace = agent(model, tmp_path).run("2+2?")
    assert trace.answer == "The answer is 4." and trace.stop_reason == "answer"


def test_an_empty_final_answer_is_fed_back_not_accepted(tmp_path):
    # An endpoint without guided decoding can send what the schema's minLength forbids.
    model = ScriptedModel(
        [Calls([("final_answer", {"answer": ""})]), Calls([("final_answer", {"answer": "4"})])]
    )
    trace = agent(model, tmp_path).run("2+2?")
    assert trace.answer == "4"
    assert "non-empty answer" in trace.steps[0].observation


def test_an_endpoint_refusing_required_is_asked_with_auto(tmp_path):
    model = ScriptedModel(
        [Calls([("add", {"a": 2, "b": 2})]), Calls([("final_answer", {"answer": "4"})])],
        refuses=("required", "named"),
    )
    trace = agent(model, tmp_path).run("2+2?")
    assert trace.answer == "4"
    choices = [r["tool_choice"] for r in model.requests]
    # One refusal, then "auto" for the rest of the run, without asking "required" again.
    assert choices == ["required", "auto", "auto"]


def test_an_endpoint_refusing_a_named_function_still_gets_the_forced_answer(tmp_path):
    model = ScriptedModel(
        [
            Calls([("add", {"a": 2, "b": 2})]),
            Calls([("add", {"a": 2, "b": 2})]),  # repeated: the answer is demanded
            Calls([("add", {"a": 2, "b": 2})]),  # under "required", still not final_answer
            "4",  # asked in plain text, without tools
        ],
        refuses=("named",),
    )
    trace = agent(model, tmp_path).run("2+2?")
    assert trace.answer == "4" and trace.steps[-1].forced
    choices = [r.get("tool_choice") for r in model.requests]
    assert choices == ["required", "required", {"type": "function", "function": {
        "name": "final_answer"}}, "required", None]  # fmt: skip


def test_other_endpoint_errors_are_not_retried(tmp_path):
    class Down(ScriptedModel):
        def chat(self, messages, **kwargs):
            self.requests.append(kwargs)
            raise ClientError("chat request refused (500): boom", 500)

    model = Down([])
    with pytest.raises(ClientError, match="500"):
        agent(model, tmp_path).run("2+2?")
    assert len(model.requests) == 1


def test_react_on_an_endpoint_refusing_stop_cuts_the_invented_observation_itself(tmp_path):
    class NoStop(ScriptedModel):
        def chat(self, messages, **kwargs):
            if "stop" in kwargs:
                self.requests.append(kwargs)
                raise ClientError("chat request refused (400): 'stop' is not supported", 400)
            return super().chat(messages, **kwargs)

    model = NoStop(
        [
            'Thought: add\nAction: add\nAction Input: {"a": 2, "b": 2}\nObservation: 5\n'
            "Final Answer: 5",
            "Final Answer: 4",
        ]
    )
    trace = Agent(model, tools=[add], strategy="react", trace_dir=tmp_path).run("2+2?")
    assert trace.tool_calls[0].observation == "4" and trace.answer == "4"
    assert ["stop" in r for r in model.requests] == [True, False, False]  # refused once
