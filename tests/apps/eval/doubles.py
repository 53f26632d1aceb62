"""Test doubles for the judge: deterministic stand-ins for an LLM.

A real small judge (the 135M default model) answers in the right shape but its verdicts are
close to chance, so tests that assert a verdict (60 days fails, 90 days passes) use
`NumberJudge`: it scores a response by whether every number in it appears in the context.
`NumberJudge` has the part of `sorai.apps.client.Client` the judge uses (`model`,
`chat_json`); `JudgeServer` serves the same rule over HTTP as an OpenAI-compatible endpoint, so
the command line and the request counting see real requests.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from typing import Any

from ..http_double import JSONHandler, LoopbackServer

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_HEADINGS = re.compile(r"^(CONTEXT|QUERY|QUESTION|RESPONSE|GROUND TRUTH|STATEMENTS):\s*$", re.M)


def sections(text: str) -> dict[str, str]:
    """The built-in prompts' user message, split at its headings."""
    parts = _HEADINGS.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def supported(claim: str, context: str) -> bool:
    return all(n in _NUMBER.findall(context) for n in _NUMBER.findall(claim))


def answer(messages: list[dict[str, Any]], schema_name: str) -> dict[str, Any]:
    """What the double answers for a request made with the built-in prompts."""
    found = sections(messages[-1]["content"])
    context = found.get("CONTEXT", "")
    if schema_name == "statements":
        statements = [s for s in re.split(r"(?<=[.。])\s*", found.get("RESPONSE", "")) if s]
        return {"statements": statements}
    if schema_name == "verdicts":
        claims = re.findall(r"^\d+\. (.*)$", found.get("STATEMENTS", ""), re.M)
        return {
            "verdicts": [
                {"reason": "numbers checked", "supported": supported(c, context)} for c in claims
            ]
        }
    response = found.get("RESPONSE", "")
    reference = context or found.get("GROUND TRUTH", "")
    if supported(response, reference):
        return {"reason": "every number in the response is in the context", "score": 5}
    missing = [n for n in _NUMBER.findall(response) if n not in _NUMBER.findall(reference)]
    return {"reason": f"{', '.join(missing)} is not in the context", "score": 1}


_CLAIM = re.compile(r"^(?:Claim|Sentence): (.*)$", re.M)
_EVIDENCE = re.compile(r"^(?:Context|Reference answer):\n?(.*?)\n\n", re.M | re.S)


def claim_supported(messages: list[dict[str, Any]]) -> bool:
    """The double's yes/no to a built-in claim prompt: the claim's numbers are all in the
    context (or the reference answer; a relevance question has none: yes)."""
    text = messages[-1]["content"]
    claim = _CLAIM.search(text)
    evidence = _EVIDENCE.search(text)
    return evidence is None or supported(claim.group(1) if claim else "", evidence.group(1))


class NumberJudge:
    """A deterministic judge double with the Client's `chat_json`; counts its calls, and can
    fail a call on purpose (`fail(call_number, queries)` returns an exception or None)."""

    def __init__(self, fail: Callable[[int, str], BaseException | None] | None = None):
        self.model = "number-judge-double"
        self.calls: list[str] = []  # the response each call judged
        self.fail = fail
        self._lock = threading.Lock()

    def chat_json(self, messages, schema, name="answer", **kwargs):
        with self._lock:
            self.calls.append(sections(messages[-1]["content"]).get("RESPONSE", ""))
            count = len(self.calls)
        if self.fail is not None and (error := self.fail(count, self.calls[-1])) is not None:
            raise error
        return answer(messages, name)

    def choice_probabilities(self, messages, choices, **kwargs):
        with self._lock:
            self.calls.append(_CLAIM.search(messages[-1]["content"]).group(1))
            count = len(self.calls)
        if self.fail is not None and (error := self.fail(count, self.calls[-1])) is not None:
            raise error
        yes = claim_supported(messages)
        return {c: float(yes == (c == "yes")) for c in choices}


class JudgeServer:
    """`NumberJudge`'s rule behind an OpenAI-compatible HTTP endpoint on a loopback port (a
    chat request without a JSON schema, a target's, is answered "The warranty lasts 90
    days."). `requests` counts the chat requests that arrived; `refuse` holds HTTP statuses
    to answer the next chat requests with, one each."""

    def __init__(self):
        self.requests: list[str] = []
        self.refuse: list[int] = []
        owner = self

        class Handler(JSONHandler):
            def do_GET(self):
                self.send_json(200, {"object": "list", "data": [{"id": "judge-double"}]})

            def do_POST(self):
                body = self.read_json()
                with owner_lock:
                    owner.requests.append(
                        sections(body["messages"][-1]["content"]).get("RESPONSE", "")
                    )
                    status = owner.refuse.pop(0) if owner.refuse else None
                if status is not None:
                    self.send_json(status, {"error": {"message": "busy", "type": "server_error"}})
                    return
                logprobs = None
                if body.get("logprobs"):  # a yes/no verdict on one claim
                    yes = claim_supported(body["messages"])
                    content = "yes" if yes else "no"
                    top = [
                        {"token": "yes", "logprob": 0.0 if yes else -30.0, "bytes": None},
                        {"token": "no", "logprob": -30.0 if yes else 0.0, "bytes": None},
                    ]
                    logprobs = {
                        "content": [
                            {**top[0 if yes else 1], "top_logprobs": top},
                        ]
                    }
                elif "response_format" in body:
                    name = body["response_format"]["json_schema"]["name"]
                    content = json.dumps(answer(body["messages"], name))
                else:  # a target's plain chat request: the right answer to the seed's table
                    content = "The warranty lasts 90 days."
                self.send_json(
                    200,
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": content},
                                "logprobs": logprobs,
                            }
                        ],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                    },
                )

        owner_lock = threading.Lock()
        self._server = LoopbackServer(Handler)
        self.url = f"{self._server.url}/v1"

    def close(self) -> None:
        self._server.close()


WARRANTY_CONTEXT = (
    "ABC products come with a limited warranty. The warranty period is 90 days from the date "
    "of purchase; repairs within the period are free of charge."
)
WARRANTY_QUERIES = [
    "How long is the warranty on ABC products?",
    "What is the warranty period of the ABC product?",
    "For how many days is an ABC product under warranty?",
    "If I bought an ABC product, how long does its warranty last?",
    "What warranty does the ABC product come with?",
]


def warranty_rows(days: int) -> list[dict[str, str]]:
    """The seed's table: five questions about ABC's warranty, expected 90 days, the output
    saying `days` days, the context stating 90 days."""
    return [
        {
            "query": q,
            "context": WARRANTY_CONTEXT,
            "ground_truth": "The warranty lasts 90 days.",
            "response": f"The ABC product's warranty lasts {days} days.",
        }
        for q in WARRANTY_QUERIES
    ]
