"""The agent with the real default model (smollm2-135m-instruct, in this process): the
`tools` strategy, every step a required call decoded under the tools' schemas."""

from __future__ import annotations

import json

from sorai.apps.agent import Agent


def test_calculator_with_the_default_model(client, tmp_path):
    agent = Agent(client, tools=["calculator"], strategy="tools", trace_dir=tmp_path)
    trace = agent.run("What is 1234 * 5678? Use the calculator.")
    calls = trace.tool_calls
    assert calls and calls[0].tool == "calculator" and calls[0].ok
    assert set(calls[0].arguments) == {"expression"}
    assert calls[0].observation == "7006652"
    assert "7006652" in trace.answer.replace(",", "")
    with open(trace.path) as f:
        data = json.load(f)
    assert data["model"] == client.model and data["prompt_tokens"] > 0
