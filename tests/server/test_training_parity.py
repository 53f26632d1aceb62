"""Training and serving turn the same messages into the same tokens.

Every record shape `sorai train` accepts is tokenized by sorai/train/data.py and, as a request
of the same messages (and tools), sent over HTTP to a server whose engine records the prompt
ids it is given: the server's whole rendering path (request parsing, ToolSetup, the chat
renderer). The server's prompt for the conversation up to each assistant turn must be exactly
the training ids before that turn, with the turn's supervised tokens starting right after it.
Run with the default model's real tokenizer (its template knows no tools: the fallback) and
with the same vocabulary under a template that renders tools itself (native).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from sorai.model.tokenizer import Tokenizer
from sorai.server.app import create_app
from sorai.server.state import ServerSettings
from sorai.train.data import IGNORE_INDEX, Example, read_records, tokenize
from tests.server.fake_engine import FakeEngine
from tests.server.harness import ServerThread

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time"}}


def call(call_id: str, name: str, arguments: dict) -> dict:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


USER = {"role": "user", "content": "What is the capital of France?"}
RECORDS: dict[str, dict[str, Any]] = {
    "plain": {"messages": [USER, {"role": "assistant", "content": "Paris."}]},
    "system": {
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            USER,
            {"role": "assistant", "content": "Paris."},
        ]
    },
    "multi_part": {
        "messages": [
            {
                "role": "system",
                "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Capital of"},
                    {"type": "text", "text": " France?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Paris"}]},
        ]
    },
    "multi_turn_weights": {
        "messages": [
            USER,
            {"role": "assistant", "content": "Lyon.", "weight": 0},
            {"role": "user", "content": "Are you sure?"},
            {"role": "assistant", "content": "Sorry: Paris.", "weight": 1},
        ]
    },
    "tool_call": {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call("call_1", "get_weather", {"city": "Paris"})],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
            {"role": "assistant", "content": "It is 18C and sunny in Paris."},
        ],
        "tools": [WEATHER],
    },
    "parallel_calls_and_results": {
        "messages": [
            {"role": "system", "content": "You are a weather bot."},
            {"role": "user", "content": "Weather in Paris and Rome, and the time?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    call("call_1", "get_weather", {"city": "Paris"}),
                    call("call_2", "get_weather", {"city": "Rome"}),
                    call("call_3", "now", {}),
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "21C"},
            {"role": "tool", "tool_call_id": "call_3", "content": "12:00"},
            {"role": "assistant", "content": "Paris 18C, Rome 21C; it is noon."},
        ],
        "tools": [WEATHER, CLOCK],
    },
    "calls_without_tools": {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call("call_1", "get_weather", {"city": "Paris"})],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "assistant", "content": "18C."},
        ]
    },
    "japanese": {
        "messages": [
            {"role": "system", "content": "日本語で答えてください。"},
            {"role": "user", "content": "東京の天気は？"},
            {
                "role": "assistant",
                "content": "調べます。",
                "tool_calls": [call("call_1", "get_weather", {"city": "東京"})],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "晴れ、18度"},
            {"role": "assistant", "content": "東京は晴れで、18度です。"},
        ],
        "tools": [WEATHER],
    },
    "alpaca": {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
}


def request_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages a client would send for this record."""
    if "messages" not in record:  # alpaca: trained as this chat
        return [
            {"role": "user", "content": f"{record['instruction']}\n\n{record['input']}"},
            {"role": "assistant", "content": record["output"]},
        ]
    return [{k: v for k, v in m.items() if k != "weight"} for m in record["messages"]]


NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function | tojson }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} "
    "{{ c.function.arguments | tojson }}</tool_call>{% endfor %}"
    "{% if m.role == 'tool' %} ({{ m.name }}){% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Server:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.engine = FakeEngine(tokenizer, context_length=4096)
        settings = ServerSettings(served_model_names=("fake-model",), embedding_model=None)
        self.thread = ServerThread(create_app(self.engine, settings)).start()

    def prompt(self, messages: list[dict], tools: list | None) -> list[int]:
        """The prompt ids the server hands its engine for this chat request."""
        body: dict[str, Any] = {"model": "fake-model", "messages": messages, "max_tokens": 1}
        if tools is not None:
            body["tools"] = tools
        reply = httpx2.post(self.thread.url + "/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        return self.engine.requests[-1][0]


@pytest.fixture(scope="module", params=["fallback", "native"])
def server(request: pytest.FixtureRequest, tokenizer: Tokenizer) -> Iterator[Server]:
    if request.param == "native":
        tokenizer = copy.copy(tokenizer)
        tokenizer._chat_templates = {"default": NATIVE_TEMPLATE}
        tokenizer.chat_template = NATIVE_TEMPLATE
        tokenizer._compiled = {}
        assert tokenizer.renders_tools
    else:
        assert not tokenizer.renders_tools
    served = Server(tokenizer)
    yield served
    served.thread.stop()


def trained(tmp_path: Path, tokenizer: Tokenizer, record: dict[str, Any]) -> Example:
    path = tmp_path / "record.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    return tokenize(read_records(path)[0], tokenizer)


@pytest.mark.parametrize("shape", RECORDS)
def test_training_prompts_are_what_the_server_renders(
    server: Server, tmp_path: Path, shape: str
) -> None:
    record = RECORDS[shape]
    tokenizer, tools = server.tokenizer, record.get("tools")
    example = trained(tmp_path, tokenizer, record)
    messages = request_messages(record)
    weights = [m.get("weight", 1) for m in record.get("messages", messages)]
    turns = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        turns += 1
        prompt = server.prompt(messages[:i], tools)
        # Byte-identical: the same ids, so the same text.
        assert example.input_ids[: len(prompt)] == prompt
        assert tokenizer.decode(example.input_ids[: len(prompt)]) == tokenizer.decode(prompt)
        # What the model writes after the server's prompt is what this turn trains.
        assert example.labels[len(prompt) - 1] == IGNORE_INDEX
        assert (example.labels[len(prompt)] != IGNORE_INDEX) == bool(weights[i])
    assert turns >= 1
    # The whole conversation as a request: the training text, then the generation prompt.
    whole = server.prompt(messages, tools)
    assert whole[: len(example)] == example.input_ids
    assert tokenizer.decode(whole[len(example) :]) == "<|im_start|>assistant\n"


def test_a_tool_calling_turn_is_trained_on_its_calls(server: Server, tmp_path: Path) -> None:
    record = RECORDS["tool_call"]
    example = trained(tmp_path, server.tokenizer, record)
    prompt = server.prompt(request_messages(record)[:1], record["tools"])
    targets = []
    for label in example.labels[len(prompt) :]:
        if label == IGNORE_INDEX:
            break
        targets.append(label)
    text = server.tokenizer.decode(targets)
    assert "get_weather" in text and "Paris" in text and text.endswith("<|im_end|>")
