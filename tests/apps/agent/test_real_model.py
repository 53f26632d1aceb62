"""The agent with the real default model (smollm2-135m-instruct, in this process): the
`tools` strategy, every step a required call decoded under the tools' schemas."""

from __future__ import annotations

import json
import os
import random

import pytest

from sorai.apps.agent import Agent

# A fixed case whose greedy picks are no near ties on any low-bit path: after "1234" in
# "1234 * 5678" the model's "*" and "." nearly tie, and the float16 GEMM path wrote 1234.5678
# where the dequantized float32 model and the int4 kernels write 1234*5678. How often the agent
# gets fresh numbers right is the slow test below.
QUESTION, PRODUCT = "What is 12 * 34? Use the calculator.", "408"


def test_calculator_with_the_default_model(client, tmp_path):
    agent = Agent(client, tools=["calculator"], strategy="tools", trace_dir=tmp_path)
    trace = agent.run(QUESTION)
    calls = trace.tool_calls
    assert calls and calls[0].tool == "calculator" and calls[0].ok
    assert set(calls[0].arguments) == {"expression"}
    assert calls[0].observation == PRODUCT
    assert PRODUCT in trace.answer.replace(",", "")
    with open(trace.path) as f:
        data = json.load(f)
    assert data["model"] == client.model and data["prompt_tokens"] > 0


def _arithmetic(client, tmp_path, count: int) -> tuple[int, list[str]]:
    """`count` two-number tasks with numbers drawn for this run (the seed is in the report, and
    SORAI_TEST_SEED replays one): how many the agent answered right, and what it did."""
    seed = int(os.environ.get("SORAI_TEST_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    solved, report = 0, [f"seed {seed}"]
    for _ in range(count):
        a, b = rng.randint(100, 9999), rng.randint(100, 9999)
        op = rng.choice("*+-")
        want = str({"*": a * b, "+": a + b, "-": a - b}[op])
        agent = Agent(client, tools=["calculator"], strategy="tools", trace_dir=tmp_path)
        trace = agent.run(f"What is {a} {op} {b}? Use the calculator.")
        right = want in trace.answer.replace(",", "")
        solved += right
        calls = [(s.arguments, s.observation) for s in trace.tool_calls]
        report.append(
            f"{a} {op} {b} = {want}: {'ok' if right else 'WRONG'} {calls} {trace.answer!r}"
        )
    return solved, report


@pytest.mark.slow
def test_the_calculator_solves_nine_of_ten(client, tmp_path):
    solved, report = _arithmetic(client, tmp_path, 10)
    assert solved >= 9, "\n".join(report)


@pytest.mark.slow
def test_the_calculator_solves_fresh_numbers(client, tmp_path):
    # Three of the ten above, with the same allowance of one miss (the fast tier keeps the
    # fixed-number case above; this one costs ~45 s on 2 cores): the
    # expression's pattern leaves the model no template ("{{number}}*{{number}}") and no list
    # to write, but now and then it still reads "1177 * 1237" as "1177.0…1237".
    solved, report = _arithmetic(client, tmp_path, 3)
    assert solved >= 2, "\n".join(report)


def test_read_file_keeps_the_directory(client, tmp_path):
    # `--tools files`: the model used to call read_file("todo.txt") for notes/todo.txt; the
    # paths that exist are now offered by name, so it picks the whole one.
    (tmp_path / "ws" / "notes").mkdir(parents=True)
    (tmp_path / "ws" / "notes" / "todo.txt").write_text("buy milk\n")
    (tmp_path / "ws" / "readme.txt").write_text("a workspace\n")
    agent = Agent(
        client, tools=["files"], workspace=tmp_path / "ws", trace_dir=tmp_path, max_iterations=3
    )
    trace = agent.run("Read the file notes/todo.txt.")
    reads = [s for s in trace.tool_calls if s.tool == "read_file"]
    assert reads and reads[0].arguments == {"path": "notes/todo.txt"}, trace.to_dict()
    assert reads[0].ok and reads[0].observation == "buy milk\n"
