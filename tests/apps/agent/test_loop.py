"""The agent's loop, driven by ScriptedModel (a test double for the LLM), under both
strategies: the moves tested here are ones the small real model cannot be made to make."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import Field

from sorai.apps.agent import Agent, Printer, ToolFailure, tool
from sorai.errors import SoraiError
from tests.apps.agent.scripted import Calls, ScriptedModel


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def double(x: int) -> int:
    """Double an integer."""
    return 2 * x


def explode(x: int) -> int:
    """Always fails."""
    raise ValueError(f"cannot handle {x}")


def sleepy() -> str:
    """Sleeps far longer than its limit."""
    time.sleep(30)
    return "woke"


def make(model: ScriptedModel, tmp_path: Path, strategy: str, tools=None, **kw) -> Agent:
    return Agent(
        model,
        tools=[add, double] if tools is None else tools,
        strategy=strategy,
        trace_dir=tmp_path / "traces",
        **kw,
    )


def react(thought: str, action: str, arguments: dict) -> str:
    return f"Thought: {thought}\nAction: {action}\nAction Input: {json.dumps(arguments)}"


# -- tools strategy (native calls) ----------------------------------------------------------


def test_tools_final_answer_without_a_tool(tmp_path):
    model = ScriptedModel([Calls([("final_answer", {"answer": "Paris"})])])
    trace = make(model, tmp_path, "tools").run("What is the capital of France?")
    assert trace.answer == "Paris"
    assert trace.stop_reason == "answer"
    assert [s.kind for s in trace.steps] == ["answer"]
    request = model.requests[0]
    assert request["tool_choice"] == "required"
    names = [t["function"]["name"] for t in request["tools"]]
    assert names == ["add", "double", "final_answer"]
    assert request["tools"][0]["function"]["parameters"]["required"] == ["a", "b"]


def test_tools_two_tool_chain(tmp_path):
    model = ScriptedModel(
        [
            Calls([("add", {"a": 2, "b": 3})]),
            Calls([("double", {"x": 5})]),
            Calls([("final_answer", {"answer": "10"})]),
        ]
    )
    trace = make(model, tmp_path, "tools").run("Double the sum of 2 and 3.")
    assert [(s.tool, s.observation) for s in trace.tool_calls] == [("add", "5"), ("double", "10")]
    assert trace.answer == "10"
    # The second request carries the first call and its result as the API's own turns.
    second = model.requests[1]["messages"]
    assert second[-2]["tool_calls"][0]["function"]["name"] == "add"
    assert second[-1] == {"role": "tool", "tool_call_id": "call_1_0", "content": "5"}


def test_tools_unknown_tool_is_answered_with_the_valid_ones(tmp_path):
    model = ScriptedModel(
        [Calls([("multiply", {"a": 2})]), Calls([("final_answer", {"answer": "ok"})])]
    )
    trace = make(model, tmp_path, "tools").run("Multiply.")
    step = trace.tool_calls[0]
    assert not step.ok
    assert "no tool 'multiply'" in step.observation and "add, double" in step.observation
    assert model.requests[1]["messages"][-1]["content"] == step.observation


def test_tools_bad_arguments_are_an_observation(tmp_path):
    model = ScriptedModel(
        [
            Calls([("add", {"a": "two", "b": 3})]),
            Calls([("add", "{not json")]),
            Calls([("final_answer", {"answer": "gave up"})]),
        ]
    )
    trace = make(model, tmp_path, "tools").run("Add.")
    assert "invalid arguments for add" in trace.steps[0].observation
    assert trace.steps[1].kind == "error" and "not JSON" in trace.steps[1].observation
    assert trace.answer == "gave up"


def test_tools_repeated_call_forces_the_final_answer(tmp_path):
    model = ScriptedModel(
        [
            Calls([("add", {"a": 2, "b": 3})]),
            Calls([("add", {"b": 3, "a": 2})]),  # the small model's habit: same call again
            Calls([("final_answer", {"answer": "5"})]),
        ]
    )
    trace = make(model, tmp_path, "tools").run("Add 2 and 3.")
    assert len(trace.tool_calls) == 1  # not run twice
    assert trace.stop_reason == "repeated_call"
    assert trace.steps[-1].forced and trace.answer == "5"
    assert model.requests[-1]["tool_choice"] == {
        "type": "function",
        "function": {"name": "final_answer"},
    }


def test_tools_the_same_failing_call_twice_ends_the_loop(tmp_path):
    model = ScriptedModel(
        [Calls([("explode", {"x": 1})])] * 3 + [Calls([("final_answer", {"answer": "no luck"})])]
    )
    trace = make(model, tmp_path, "tools", tools=[explode]).run("Explode 1.")
    assert [s.ok for s in trace.tool_calls] == [False, False]  # the third is not run
    assert trace.stop_reason == "repeated_call" and trace.answer == "no luck"


def test_tools_a_blank_forced_answer_is_asked_again_in_text(tmp_path):
    model = ScriptedModel(
        [Calls([("add", {"a": 2, "b": 3})])] * 2
        + [Calls([("final_answer", {"answer": "  "})]), "The sum is 5."]
    )
    trace = make(model, tmp_path, "tools").run("Add 2 and 3.")
    assert trace.answer == "The sum is 5." and trace.steps[-1].forced
    assert "tools" not in model.requests[-1]  # plain text, no tools offered
    assert trace.steps[-1].completion_tokens == 10  # both requests counted


# -- react strategy (text) ------------------------------------------------------------------


def test_react_final_answer_without_a_tool(tmp_path):
    model = ScriptedModel(["Thought: I know this.\nFinal Answer: Paris"])
    trace = make(model, tmp_path, "react").run("What is the capital of France?")
    assert trace.answer == "Paris" and trace.steps[0].thought == "I know this."
    system = model.requests[0]["messages"][0]["content"]
    assert "add(a: integer, b: integer): Add two integers." in system
    assert "one of [add, double]" in system
    assert model.requests[0]["stop"]


def test_react_two_tool_chain_ignores_an_invented_observation(tmp_path):
    model = ScriptedModel(
        [
            react("First the sum.", "add", {"a": 2, "b": 3})
            + "\nObservation: 99\nFinal Answer: 99",
            react("Now double it.", "double", {"x": 5}),
            "Thought: done\nFinal Answer: 10",
        ]
    )
    trace = make(model, tmp_path, "react").run("Double the sum of 2 and 3.")
    assert [(s.tool, s.arguments, s.observation) for s in trace.tool_calls] == [
        ("add", {"a": 2, "b": 3}, "5"),
        ("double", {"x": 5}, "10"),
    ]
    assert trace.answer == "10"
    assert model.requests[1]["messages"][-1] == {"role": "user", "content": "Observation: 5"}


def test_react_malformed_output_is_recovered_after_feedback(tmp_path):
    model = ScriptedModel(
        [
            "I think the answer involves adding.",  # no Action, no Final Answer
            "Action: add",  # no Action Input
            'Thought: retry\nAction: add\nAction Input: {"a": 1, "b": 1}',
            "Final Answer: 2",
        ]
    )
    trace = make(model, tmp_path, "react").run("Add 1 and 1.")
    assert [s.kind for s in trace.steps] == ["error", "error", "tool", "answer"]
    feedback = model.requests[1]["messages"][-1]["content"]
    assert feedback.startswith("Observation: Invalid format: your reply has neither")
    assert "Action Input:" in feedback and "Final Answer:" in feedback
    assert "no 'Action Input:'" in model.requests[2]["messages"][-1]["content"]
    assert trace.answer == "2"


def test_react_unknown_tool(tmp_path):
    model = ScriptedModel([react("", "search", {"q": "x"}), "Final Answer: none"])
    trace = make(model, tmp_path, "react").run("Find x.")
    observation = model.requests[1]["messages"][-1]["content"]
    assert observation == "Observation: there is no tool 'search'; the tools are: add, double"
    assert trace.answer == "none"


@pytest.mark.parametrize("strategy", ["react", "tools"])
def test_a_tool_that_raises_is_an_observation(tmp_path, strategy):
    call = react("", "explode", {"x": 3}) if strategy == "react" else Calls([("explode", {"x": 3})])
    final = (
        "Final Answer: it failed"
        if strategy == "react"
        else Calls([("final_answer", {"answer": "it failed"})])
    )
    model = ScriptedModel([call, final])
    trace = make(model, tmp_path, strategy, tools=[explode]).run("Explode 3.")
    step = trace.tool_calls[0]
    assert not step.ok and step.observation == "explode raised ValueError: cannot handle 3"
    assert trace.answer == "it failed"


@pytest.mark.parametrize("strategy", ["react", "tools"])
def test_a_tool_that_times_out_is_an_observation(tmp_path, strategy):
    slow = tool(sleepy, timeout=0.5)
    call = react("", "sleepy", {}) if strategy == "react" else Calls([("sleepy", {})])
    final = (
        "Final Answer: too slow"
        if strategy == "react"
        else Calls([("final_answer", {"answer": "too slow"})])
    )
    model = ScriptedModel([call, final])
    started = time.monotonic()
    trace = make(model, tmp_path, strategy, tools=[slow]).run("Sleep.")
    assert time.monotonic() - started < 20  # not the tool's 30 s
    assert trace.tool_calls[0].observation == "sleepy timed out after 0.5 s"
    assert trace.answer == "too slow"


@pytest.mark.parametrize("strategy", ["react", "tools"])
def test_the_iteration_limit_forces_a_final_answer(tmp_path, strategy):
    calls = [
        react("", "add", {"a": i, "b": 1})
        if strategy == "react"
        else Calls([("add", {"a": i, "b": 1})])
        for i in range(3)
    ]
    final = (
        "Thought: out of steps\nFinal Answer: 3"
        if strategy == "react"
        else Calls([("final_answer", {"answer": "3"})])
    )
    model = ScriptedModel([*calls, final])
    trace = make(model, tmp_path, strategy, max_iterations=3).run("Count.")
    assert len(trace.tool_calls) == 3
    assert trace.stop_reason == "max_iterations"
    assert trace.steps[-1].forced and trace.answer == "3"
    assert not model.replies  # exactly 3 steps and the forced answer


def test_the_time_limit_forces_a_final_answer(tmp_path):
    slow = tool(sleepy, timeout=60)
    model = ScriptedModel([Calls([("sleepy", {})]), Calls([("final_answer", {"answer": "late"})])])
    trace = make(model, tmp_path, "tools", tools=[slow], max_seconds=0.5).run("Sleep.")
    # The tool's own limit is cut to the time left; then the answer is demanded.
    assert "timed out" in trace.tool_calls[0].observation
    assert trace.stop_reason == "time_limit" and trace.answer == "late"


def test_react_forced_answer_without_the_label_takes_the_text(tmp_path):
    model = ScriptedModel([react("", "add", {"a": 1, "b": 2}), "It is 3."])
    trace = make(model, tmp_path, "react", max_iterations=1).run("Add.")
    assert trace.answer == "It is 3." and trace.stop_reason == "max_iterations"


# -- memory, traces, tools ------------------------------------------------------------------


def test_memory_across_turns_and_reset(tmp_path):
    model = ScriptedModel(
        [
            Calls([("final_answer", {"answer": "Hello Ann"})]),
            Calls([("final_answer", {"answer": "Ann"})]),
            Calls([("final_answer", {"answer": "?"})]),
        ]
    )
    agent = make(model, tmp_path, "tools")
    agent.run("My name is Ann.")
    agent.run("What is my name?")
    turns = [(m["role"], m["content"]) for m in model.requests[1]["messages"][1:]]
    assert turns == [
        ("user", "My name is Ann."),
        ("assistant", "Hello Ann"),
        ("user", "What is my name?"),
    ]
    agent.reset()
    agent.run("What is my name?")
    assert len(model.requests[2]["messages"]) == 2  # the system prompt and the task


def test_trace_is_written_as_json_and_printed_live(tmp_path):
    out = io.StringIO()
    model = ScriptedModel(
        [Calls([("add", {"a": 2, "b": 3})]), Calls([("final_answer", {"answer": "5"})])]
    )
    trace = make(model, tmp_path, "tools", on_step=Printer(out)).run("Add 2 and 3.")
    data = json.loads(Path(trace.path).read_text())
    assert Path(trace.path).parent == tmp_path / "traces"
    assert data["task"] == "Add 2 and 3." and data["answer"] == "5"
    assert data["strategy"] == "tools" and data["model"] == "scripted-model"
    assert data["steps"][0]["tool"] == "add" and data["steps"][0]["observation"] == "5"
    assert data["prompt_tokens"] == 20 and data["completion_tokens"] == 10
    assert data["steps"][0]["tool_seconds"] >= 0 and data["seconds"] > 0
    printed = out.getvalue()
    assert 'Action: add {"a": 2, "b": 3}' in printed and "Final Answer: 5" in printed


def test_async_tools_run_and_time_out(tmp_path):
    async def fetch(key: str) -> str:
        """An async lookup."""
        await asyncio.sleep(0)
        return key.upper()

    async def hang() -> str:
        """Never returns in time."""
        await asyncio.sleep(30)
        return "late"

    assert tool(fetch)({"key": "a"}).output == "A"
    result = tool(hang, timeout=0.3)({})
    assert not result.ok and result.output == "hang timed out after 0.3 s"


def test_tool_schema_comes_from_the_signature():
    def pick(
        colour: Literal["red", "blue"],
        count: Annotated[int, Field(ge=1, le=9, description="how many")] = 1,
        note: str | None = None,
    ) -> str:
        """Pick some balls.

        Longer text that is not the description."""
        if count > 5:
            raise ToolFailure("not that many")
        return f"{count} {colour}"

    t = tool(pick)
    assert t.description == "Pick some balls."
    props = t.parameters["properties"]
    assert props["colour"]["enum"] == ["red", "blue"]
    assert props["count"] == {
        "default": 1,
        "description": "how many",
        "maximum": 9,
        "minimum": 1,
        "type": "integer",
    }
    assert t.parameters["required"] == ["colour"]
    assert t.parameters["additionalProperties"] is False
    assert t({"colour": "red", "count": 2}).output == "2 red"
    assert t({"colour": "red", "count": 7}).output == "pick failed: not that many"
    bad = t({"colour": "green", "extra": 1})
    assert not bad.ok and "colour" in bad.output and "extra" in bad.output
    with pytest.raises(SoraiError, match="no type hint"):
        tool(lambda x: x)


def test_bad_agent_options_are_clear_errors(tmp_path):
    model = ScriptedModel([])
    with pytest.raises(SoraiError, match="unknown strategy 'plan'"):
        Agent(model, strategy="plan")
    with pytest.raises(SoraiError, match="unknown tool 'nope'"):
        Agent(model, tools=["nope"])
    with pytest.raises(SoraiError, match="need a workspace"):
        Agent(model, tools=["files"])
    with pytest.raises(SoraiError, match="is not a directory"):
        Agent(model, tools=["files"], workspace=tmp_path / "missing")
    with pytest.raises(SoraiError, match="two tools are named 'add'"):
        Agent(model, tools=[add, add])


def test_an_endpoint_failure_raises_and_still_writes_the_trace(tmp_path):
    from sorai.apps.client import ClientError

    def unreachable(messages):
        raise ClientError("cannot reach http://127.0.0.1:9/v1")

    model = ScriptedModel([Calls([("add", {"a": 1, "b": 2})]), unreachable])
    with pytest.raises(ClientError):
        make(model, tmp_path, "tools").run("Add.")
    (written,) = (tmp_path / "traces").glob("*.json")
    data = json.loads(written.read_text())
    assert data["stop_reason"] == "error: cannot reach http://127.0.0.1:9/v1"
    assert data["steps"][0]["observation"] == "3"


def test_a_tool_calling_sys_exit_does_not_end_the_agent():
    def quit_now() -> str:
        """Exits."""
        raise SystemExit(3)

    result = tool(quit_now)({})
    assert not result.ok and result.output == "quit_now exited (code 3)"


def test_ctrl_c_leaves_a_whole_trace_and_no_partial_file(tmp_path):
    def interrupted(messages):
        raise KeyboardInterrupt

    model = ScriptedModel([Calls([("add", {"a": 1, "b": 2})]), interrupted])
    with pytest.raises(KeyboardInterrupt):
        make(model, tmp_path, "tools").run("Add.")
    written = list((tmp_path / "traces").iterdir())
    assert [p.suffix for p in written] == [".json"]  # no .partial left beside it
    data = json.loads(written[0].read_text())
    assert data["stop_reason"] == "error: KeyboardInterrupt" and data["steps"][0]["ok"]


def test_an_unwritable_trace_dir_does_not_hide_the_endpoint_error(tmp_path):
    from sorai.apps.client import ClientError

    def unreachable(messages):
        raise ClientError("cannot reach the endpoint")

    (tmp_path / "file").write_text("")
    agent = Agent(ScriptedModel([unreachable]), tools=[add], trace_dir=tmp_path / "file" / "x")
    with pytest.raises(ClientError, match="cannot reach"):
        agent.run("Add.")


def test_the_conversation_keeps_only_the_last_turns(tmp_path):
    model = ScriptedModel([Calls([("final_answer", {"answer": f"a{i}"})]) for i in range(6)])
    agent = make(model, tmp_path, "tools", history_turns=2)
    for i in range(6):
        agent.run(f"t{i}")
    assert [m["content"] for m in agent.history] == ["t4", "a4", "t5", "a5"]
    sent = [m["content"] for m in model.requests[-1]["messages"][1:]]
    assert sent == ["t3", "a3", "t4", "a4", "t5"]


def test_a_tool_named_final_answer_is_refused_under_the_tools_strategy(tmp_path):
    def final_answer(answer: str) -> str:
        """Mine."""
        return answer

    with pytest.raises(SoraiError, match="'final_answer' is the tools strategy's own"):
        make(ScriptedModel([]), tmp_path, "tools", tools=[final_answer])
    assert make(ScriptedModel([]), tmp_path, "react", tools=[final_answer])
