"""ScriptedModel: a test double for the LLM, named as such. It answers `chat` with the replies
it was given, in order, as OpenAI response objects (what `Client.chat` returns), and records
every request so tests can check what the agent sent. Used where a test needs the model to
make a particular move (a two-tool chain, malformed output, an unknown tool) that the small
real model cannot be relied on to make."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from openai.types.chat import ChatCompletion

from sorai.apps.client import ClientError


@dataclass
class Calls:
    """A reply made of tool calls: [(name, arguments), ...]; arguments a dict, or raw text."""

    calls: list[tuple[str, Any]]


@dataclass
class Raw:
    """A reply given as the API's message object itself, with its finish_reason: for shapes
    Calls does not make (text beside calls, invalid JSON, a cut-off reply)."""

    message: dict[str, Any]
    finish_reason: str = "stop"


@dataclass
class ScriptedModel:
    # A reply: text, tool calls, or a function of the request's messages giving either (for a
    # move that depends on what a tool returned, e.g. a file name it made).
    replies: list[str | Calls | Raw | Callable[[list[dict[str, Any]]], str | Calls]]
    model: str = "scripted-model"
    requests: list[dict[str, Any]] = field(default_factory=list)
    # tool_choice kinds ("required", "named") answered with a 400, as some endpoints do
    refuses: tuple[str, ...] = ()

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> ChatCompletion:
        self.requests.append({"messages": json.loads(json.dumps(messages)), **kwargs})
        choice = kwargs.get("tool_choice")
        kind = "named" if isinstance(choice, dict) else choice
        if kind in self.refuses:
            raise ClientError(f"chat request refused (400): tool_choice {kind} unsupported", 400)
        if not self.replies:
            raise AssertionError(f"the script ran out at request {len(self.requests)}")
        reply = self.replies.pop(0)
        if callable(reply):
            reply = reply(messages)
        message: dict[str, Any] = {"role": "assistant", "content": None}
        finish = "stop"
        if isinstance(reply, Raw):
            message, finish = {"role": "assistant", **reply.message}, reply.finish_reason
        elif isinstance(reply, Calls):
            finish = "tool_calls"
            message["tool_calls"] = [
                {
                    "id": f"call_{len(self.requests)}_{i}",
                    "type": "function",
                    "function": {
                        "name": name,
                        "arguments": args if isinstance(args, str) else json.dumps(args),
                    },
                }
                for i, (name, args) in enumerate(reply.calls)
            ]
        else:
            # As an endpoint does: the text ends before the first stop string.
            for stop in kwargs.get("stop") or []:
                if stop in reply:
                    reply = reply[: reply.index(stop)]
            message["content"] = reply
        return ChatCompletion.model_validate(
            {
                "id": f"scripted-{len(self.requests)}",
                "object": "chat.completion",
                "created": 0,
                "model": self.model,
                "choices": [{"index": 0, "finish_reason": finish, "message": message}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        )
