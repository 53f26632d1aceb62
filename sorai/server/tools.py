"""Tool calling for /v1/chat/completions: the glue between the protocol and the chat renderer.

sorai/model/chat.py holds the logic (messages and tool definitions -> the prompt, natively or
in the fallback format, and parsing calls out of text; see its docstring), and
sorai/engine/tools.py the forced-call constraint. Here a request's pydantic messages become
its plain dicts, its ToolErrors become 400s naming the field (`param`), answers' calls become
ToolCall models, and streams become DeltaMessages (ToolStream).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sorai.engine import tools as engine_tools
from sorai.errors import SoraiError
from sorai.model import chat
from sorai.model.chat import new_call_id, parse_calls, split_forced
from sorai.server.errors import from_sorai_error
from sorai.server.protocol import (
    ChatMessage,
    DeltaMessage,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
)

if TYPE_CHECKING:
    from sorai.model.tokenizer import Tokenizer

__all__ = ["ToolSetup", "ToolStream", "api_errors", "fallback_messages"]


@contextmanager
def api_errors() -> Iterator[None]:
    """A SoraiError (a ToolError naming its field) becomes the 400 the API answers."""
    try:
        yield
    except SoraiError as exc:
        raise from_sorai_error(exc) from None


def plain_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The request's messages as the OpenAI-shaped dicts sorai/model/chat.py takes."""
    return [m.model_dump(exclude_none=True) for m in messages]


def fallback_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    with api_errors():
        return chat.fallback_messages(plain_messages(messages))


class ToolSetup(engine_tools.ToolSetup):
    """sorai.engine.tools.ToolSetup over the protocol's types: 400s, ChatMessages, ToolCalls."""

    @classmethod
    def from_request(
        cls, tools: Any, tool_choice: Any = None, parallel_tool_calls: bool | None = None
    ) -> ToolSetup:
        with api_errors():
            return super().from_request(tools, tool_choice, parallel_tool_calls)  # type: ignore[return-value]

    def template_input(  # type: ignore[override]
        self, tokenizer: Tokenizer, messages: Sequence[ChatMessage]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        with api_errors():
            return super().template_input(tokenizer, plain_messages(messages))

    def answer(  # type: ignore[override]
        self, text: str, finish_reason: str | None
    ) -> tuple[str | None, list[ToolCall] | None, str | None]:
        """(content, tool_calls, finish_reason) of one whole choice."""
        content, calls, reason = super().answer(text, finish_reason)
        models = [ToolCall.model_validate(c) for c in calls] if calls is not None else None
        return content, models, reason

    def stream(self) -> ToolStream:
        return ToolStream(self)


# -- streaming -------------------------------------------------------------------------------

# Where, in auto mode, a call might begin: content is streamed only up to the first of these.
_MAYBE_CALL = re.compile(r"[\[{<`]")


@dataclass
class ToolStream:
    """One choice's stream when tools are active: text deltas in, DeltaMessages out.

    Forced calls stream as they are generated: a first delta naming the call (id, type,
    function.name, arguments ""), then argument fragments. In auto mode, text is streamed as
    content up to the first character that could start a call ({ [ < `); the rest is held
    until the end, then sent as content or as tool-call deltas.
    """

    setup: ToolSetup
    text: str = ""
    sent: int = 0  # characters of content (auto) or arguments (forced) already sent
    call_id: str | None = None
    held: bool = False  # auto: a possible call has begun
    pending_logprobs: list[Any] = field(default_factory=list)  # the caller's, not yet sent

    def feed(self, piece: str) -> list[DeltaMessage]:
        self.text += piece
        if self.setup.forced:
            return self._forced(final=False)
        if self.held:
            return []
        limit = len(self.text)
        match = _MAYBE_CALL.search(self.text, self.sent)
        if match is not None:
            self.held = True
            limit = match.start()
        # Trailing whitespace waits: it is dropped if a call follows.
        end = len(self.text[:limit].rstrip())
        return self._content(end)

    def finish(self, finish_reason: str | None) -> tuple[list[DeltaMessage], str | None]:
        """The remaining deltas and the choice's finish_reason, once generation has ended."""
        if self.setup.forced:
            deltas = self._forced(final=True)
            found = split_forced(self.text)
            if found is None:
                return self._content(len(self.text)), finish_reason
            return deltas, "tool_calls" if found[2] else finish_reason
        parsed = parse_calls(self.text, self.setup.names)
        if parsed is None:
            return self._content(len(self.text)), finish_reason
        content, calls = parsed
        if not self.setup.parallel:
            calls = calls[:1]
        deltas = self._content(len(content or ""))
        for i, (name, arguments) in enumerate(calls):
            deltas.append(_call_start(i, new_call_id(), name))
            deltas.append(_arguments(i, arguments))
        return deltas, "tool_calls"

    def _content(self, end: int) -> list[DeltaMessage]:
        if end <= self.sent:
            return []
        piece = self.text[self.sent : end]
        self.sent = end
        return [DeltaMessage(content=piece)]

    def _forced(self, final: bool) -> list[DeltaMessage]:
        found = split_forced(self.text)
        if found is None:
            return []
        name, arguments, _ = found
        deltas = []
        if self.call_id is None:
            self.call_id = new_call_id()
            deltas.append(_call_start(0, self.call_id, name))
        if not final:
            # Hold back what may be the call's closing brace.
            arguments = chat.pending_arguments(self.text) or ""
        if len(arguments) > self.sent:
            deltas.append(_arguments(0, arguments[self.sent :]))
            self.sent = len(arguments)
        return deltas


def _call_start(index: int, call_id: str, name: str) -> DeltaMessage:
    return DeltaMessage(
        tool_calls=[
            ToolCallDelta(
                index=index,
                id=call_id,
                type="function",
                function=FunctionCallDelta(name=name, arguments=""),
            )
        ]
    )


def _arguments(index: int, fragment: str) -> DeltaMessage:
    return DeltaMessage(
        tool_calls=[ToolCallDelta(index=index, function=FunctionCallDelta(arguments=fragment))]
    )
