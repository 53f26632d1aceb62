"""POST /v1/responses, GET/DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items.

A request becomes a chat request (items.py) and runs on the chat machinery: the one chat
renderer, tools (server/tools.py: forced calls and the auto constraint) and guided decoding
(text.format json_schema as response_format). Stored responses (store: true, the default) keep
the conversation as chat messages, so previous_response_id continues it after a restart.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sorai.errors import SoraiError
from sorai.server.body import read_json
from sorai.server.chat import prepare
from sorai.server.errors import APIError, bad_request, describe_validation_error
from sorai.server.guided import checked, failed
from sorai.server.models import route
from sorai.server.protocol import ChatCompletionRequest, Usage, _Request, make_usage
from sorai.server.responses import EventStream, UsageTally, error_event, list_page
from sorai.server.responses_api import items as it
from sorai.server.responses_api.hosted import HostedContext, hosted_tools
from sorai.server.responses_api.store import ResponseStore, StoredResponse
from sorai.server.runner import Generation, unless_disconnected
from sorai.server.state import get_state
from sorai.server.tools import ToolSetup, ToolStream

router = APIRouter()


class ResponseRequest(_Request):
    model: str | None = None
    input: Any = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    store: bool | None = True
    stream: bool | None = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    seed: int | None = None  # sorai's extra, as in chat completions


def response_store(request: Request) -> ResponseStore:
    """The app's store, opened on first use (a server that never stores writes no file)."""
    store = getattr(request.app.state, "response_store", None)
    if store is None:
        path = get_state(request).settings.data_path() / "responses.sqlite"
        store = request.app.state.response_store = ResponseStore(path)
    return store


class _Turn:
    """One response being made: its request, the conversation before it, and its output."""

    def __init__(
        self,
        body: ResponseRequest,
        model: str,
        items: list,
        history: list,
        hosted: dict[str, Any] | None = None,
    ) -> None:
        self.hosted = hosted or {}  # the app's hosted tools, which read their own items
        self.id = it.new_item_id("resp")
        self.created_at = int(time.time())
        self.body = body
        self.model = model
        self.input_items = items
        self.history = history
        self.output: list[dict[str, Any]] = []
        self.status = "in_progress"
        self.incomplete: dict[str, str] | None = None
        self.usage: dict[str, Any] | None = None
        self.conversation = self.id  # the first response's id, through previous_response_id

    def add_answer(
        self, content: str | None, calls: list | None, annotations: list | None = None
    ) -> None:
        if content:
            self.output.append(it.message_item(content, annotations=annotations))
        for call in calls or []:
            function = call.function
            self.output.append(it.function_call_item(call.id, function.name, function.arguments))

    def finish(self, finish_reason: str | None, usage: Usage) -> None:
        self.status = "completed"
        if finish_reason == "length":
            self.status = "incomplete"
            self.incomplete = {"reason": "max_output_tokens"}
        self.usage = {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.prompt_tokens_details.cached_tokens},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens,
        }

    def object(self) -> dict[str, Any]:
        body = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "error": None,
            "incomplete_details": self.incomplete,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": self.model,
            "output": self.output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": None,
            "store": body.store is not False,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": body.text or {"format": {"type": "text"}},
            "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [],
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": "disabled",
            "usage": self.usage,
            "user": body.user,
            "metadata": body.metadata or {},
            "conversation": {"id": self.conversation},
        }

    def save(self, store: ResponseStore) -> None:
        if self.body.store is False:
            return
        history = self.history + it.chat_messages(self.input_items + self.output, self.hosted)
        store.put(StoredResponse(self.object(), self.input_items, history))


@router.post("/v1/responses")
async def create_response(request: Request) -> Response:
    arrival = time.perf_counter()
    store = response_store(request)
    hosted = hosted_tools(request.app)
    body = await read_json(request, ResponseRequest)
    items = it.input_items(body.input, hosted)
    history: list[dict[str, Any]] = []
    conversation = None
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        if previous is None:
            raise APIError(
                404,
                f"no stored response has the id {body.previous_response_id!r} (responses made "
                "with store: false are not kept)",
                param="previous_response_id",
                code="response_not_found",
            )
        history = previous.history
        conversation = (previous.response.get("conversation") or {}).get("id")
    fields = _chat_fields(body, history, items, hosted)
    chat = _validated(fields)
    state, model = await route(request, chat.model)
    turn = _Turn(body, model, items, history, hosted)
    turn.conversation = conversation or turn.id
    specs = {t["type"]: t for t in body.tools or [] if t.get("type") in hosted}
    if specs:
        for kind, spec in specs.items():
            hosted[kind].check(spec, request.app)
        event = _Events()
        # The first round starts here, before any answer goes out: a prompt too long, a full
        # server or a stopped engine is then the request's own status (400/429/503), not an
        # error event after a 200.
        first = _generation(state, chat, turn.model, f"{turn.id}-0", arrival)
        await unless_disconnected(request, first[1].start())
        rounds = _hosted_rounds(request, state, fields, turn, specs, arrival, event, first)
        if body.stream:
            stream = _guarded(_hosted_stream(turn, rounds, event, store))
            return EventStream(stream, on_close=first[1].close)
        await unless_disconnected(request, _drain(rounds))
        turn.save(store)
        return JSONResponse(turn.object())
    tools, generation = _generation(state, chat, turn.model, turn.id, arrival)
    await unless_disconnected(request, generation.start())
    if body.stream:
        events = _guarded(_stream(turn, tools, generation, store))
        return EventStream(events, on_close=generation.close)
    try:
        content, calls, reason, tally = await unless_disconnected(
            request, _collect(tools, generation)
        )
    finally:
        await generation.close()
    turn.add_answer(content, calls)
    turn.finish(reason, tally.usage())
    turn.save(store)
    return JSONResponse(turn.object())


def _generation(
    state: Any, chat: ChatCompletionRequest, model: str, request_id: str, arrival: float
) -> tuple[ToolSetup, Generation]:
    """The request's tools and its engine request, checked (not started)."""
    tools, prompt_ids, params, guided_param = prepare(state, chat, model, "text.format")
    generation = Generation(state, [(prompt_ids, params)], request_id, arrival)
    with checked(guided_param):
        generation.check()
    return tools, generation


# Model turns one response may take around hosted tool calls (each call, then an answer).
MAX_HOSTED_ROUNDS = 4


async def _hosted_rounds(
    request: Request,
    state: Any,
    fields: dict[str, Any],
    turn: _Turn,
    specs: dict[str, dict[str, Any]],
    arrival: float,
    event: _Events,
    first: tuple[ToolSetup, Generation],
) -> AsyncIterator[str]:
    """Generate; run the hosted tools the answer calls and generate again with their results,
    until an answer calls none (or MAX_HOSTED_ROUNDS): the response's output is every call's
    item, then the final answer, cited. Yields the stream's events as they happen: text as it
    is generated, each call's item and its progress events around its run. `first`: the first
    round's (tools, generation), already started by the caller."""
    hosted = hosted_tools(request.app)
    messages = list(fields["messages"])
    question = _last_user_text(messages)
    annotations: list[dict[str, Any]] = []
    prompt = completion = cached = 0
    reason: str | None = None
    for round_number in range(MAX_HOSTED_ROUNDS):
        start = len(turn.output)  # this round's items begin here
        if round_number == 0:
            tools, generation = first
        else:
            chat = _validated({**fields, "messages": messages})
            tools, generation = _generation(
                state, chat, turn.model, f"{turn.id}-{round_number}", arrival
            )
        writer = _OutputWriter(turn, event, held=set(specs))
        try:
            if round_number:
                await generation.start()
            async for piece in _write(tools, generation, writer):
                yield piece
        finally:
            await generation.close()
        reason = writer.finish
        usage = writer.tally.usage()
        prompt += usage.prompt_tokens
        completion += usage.completion_tokens
        cached += usage.prompt_tokens_details.cached_tokens
        own = list(writer.held_calls.values())
        if not own or round_number == MAX_HOSTED_ROUNDS - 1:
            for piece in writer.close(annotations):
                yield piece
            break
        for piece in writer.close():
            yield piece
        for name, raw in own:
            tool, spec = hosted[name], specs[name]
            call = _run_hosted(request, turn, tool, spec, raw, question, annotations, event)
            async for piece in call:
                yield piece
        if writer.calls:
            # It also called the client's own functions: the response ends with those calls
            # for the client to answer (with previous_response_id), as without hosted tools.
            break
        # The round's text, if any, and its calls with their results, as one assistant turn.
        messages += it.chat_messages(turn.output[start:], hosted)
        # After the tools ran, the model answers from their results rather than calling again.
        fields = {**fields, "tool_choice": "none"}
    turn.finish(reason, make_usage(prompt, completion, cached))


async def _run_hosted(
    request: Request,
    turn: _Turn,
    tool: Any,
    spec: dict[str, Any],
    raw_arguments: str,
    question: str,
    annotations: list[dict[str, Any]],
    event: _Events,
) -> AsyncIterator[str]:
    """One hosted call: its item added (in progress), the tool's progress events, its run,
    the finished item in its place (last in the output) and its annotations added to
    `annotations`."""
    try:
        arguments = json.loads(raw_arguments or "{}")
    except json.JSONDecodeError:
        arguments = {}
    if not isinstance(arguments, dict):
        arguments = {}
    item = tool.pending("", arguments)  # the tool names its item (fs_..., ci_...)
    index = len(turn.output)
    turn.output.append(item)
    common = {"item_id": item["id"], "output_index": index}
    kind = f"response.{tool.kind}_call"
    yield event("response.output_item.added", output_index=index, item=item)
    yield event(f"{kind}.in_progress", **common)
    if item.get("code"):  # code_interpreter streams its code before it runs it
        yield event("response.code_interpreter_call_code.delta", delta=item["code"], **common)
        yield event("response.code_interpreter_call_code.done", code=item["code"], **common)
    yield event(f"{kind}.{tool.phase}", **common)
    context = HostedContext(request.app, turn.conversation, question, item["id"])
    result = await tool.run(spec, arguments, context)
    turn.output[index] = result.item
    annotations += result.annotations
    yield event(f"{kind}.completed", **common)
    yield event("response.output_item.done", output_index=index, item=result.item)


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return ""


async def _hosted_stream(
    turn: _Turn, rounds: AsyncIterator[str], event: _Events, store: ResponseStore
) -> AsyncIterator[str]:
    yield event("response.created", response=turn.object())
    yield event("response.in_progress", response=turn.object())
    async for piece in rounds:
        yield piece
    turn.save(store)
    kind = "response.incomplete" if turn.status == "incomplete" else "response.completed"
    yield event(kind, response=turn.object())


async def _drain(events: AsyncIterator[str]) -> None:
    async for _ in events:
        pass


def _chat_fields(
    body: ResponseRequest,
    history: list[dict[str, Any]],
    items: list[dict[str, Any]],
    hosted: dict[str, Any],
) -> dict[str, Any]:
    """The chat request this response is made as: instructions (never inherited from the
    previous response, as in OpenAI's API), the stored conversation, the new items."""
    messages = list(history)
    if body.instructions:
        messages.insert(0, {"role": "system", "content": body.instructions})
    messages += it.chat_messages(items, hosted)
    fields = {
        "model": body.model,
        "messages": messages,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "tools": it.chat_tools(body.tools, hosted),
        "tool_choice": it.chat_tool_choice(body.tool_choice, hosted),
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": it.response_format(body.text),
    }
    return {k: v for k, v in fields.items() if v is not None}


def _validated(fields: dict[str, Any]) -> ChatCompletionRequest:
    try:
        chat = ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        raise describe_validation_error(exc) from None
    chat.check()
    return chat


async def _collect(
    tools: ToolSetup, generation: Generation
) -> tuple[str | None, list | None, str | None, UsageTally]:
    """The whole answer: (content, tool calls, finish_reason, usage)."""
    texts: list[str] = []
    finish: str | None = None
    tally = UsageTally(1)
    async for i, output in generation.outputs():
        tally.add(i, output)
        for delta in output.choices:
            failed(delta)
            texts.append(delta.text)
            if delta.finish_reason is not None:
                finish = delta.finish_reason
    if finish in (None, "abort"):
        raise generation.aborted()
    content, calls, reason = tools.answer("".join(texts), finish)
    return content, calls, reason, tally


class _Events:
    """The typed SSE events of one streamed response, numbered in order."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(
    turn: _Turn, tools: ToolSetup, generation: Generation, store: ResponseStore
) -> AsyncIterator[str]:
    event = _Events()
    yield event("response.created", response=turn.object())
    yield event("response.in_progress", response=turn.object())
    writer = _OutputWriter(turn, event)
    async for piece in _write(tools, generation, writer):
        yield piece
    for piece in writer.close():
        yield piece
    turn.finish(writer.finish, writer.tally.usage())
    turn.save(store)
    kind = "response.incomplete" if turn.status == "incomplete" else "response.completed"
    yield event(kind, response=turn.object())


async def _write(
    tools: ToolSetup, generation: Generation, writer: _OutputWriter
) -> AsyncIterator[str]:
    """One generation's text and tool calls into `writer`, as events while they stream; the
    writer keeps its finish_reason and usage."""
    tool_stream: ToolStream | None = tools.stream() if tools.active else None
    async for i, output in generation.outputs():
        writer.tally.add(i, output)
        for delta in output.choices:
            if delta.finish_reason == "abort":
                raise generation.aborted()
            failed(delta)
            if tool_stream is None:
                if delta.text:
                    for piece in writer.text(delta.text):
                        yield piece
                if delta.finish_reason is not None:
                    writer.finish = delta.finish_reason
                continue
            messages = tool_stream.feed(delta.text) if delta.text else []
            if delta.finish_reason is not None:
                more, writer.finish = tool_stream.finish(delta.finish_reason)
                messages += more
            for message in messages:
                if message.content:
                    for piece in writer.text(message.content):
                        yield piece
                for call in message.tool_calls or []:
                    for piece in writer.call(call):
                        yield piece


class _OutputWriter:
    """Output items as they stream: an assistant message (opened on its first text) and one
    function_call item per tool call, each added, filled by deltas and closed by done events.
    Calls of the functions in `held` (hosted tools) are kept in held_calls instead: the
    server runs them."""

    def __init__(self, turn: _Turn, event: _Events, held: set[str] | None = None) -> None:
        self.turn = turn
        self.event = event
        self.message: dict[str, Any] | None = None
        self.calls: dict[int, dict[str, Any]] = {}  # the tool call's index -> its item
        self.open: list[dict[str, Any]] = []
        self.held = held or set()
        self.held_calls: dict[int, tuple[str, str]] = {}  # index -> (name, arguments)
        self.finish: str | None = None
        self.tally = UsageTally(1)

    def _add(self, item: dict[str, Any]) -> str:
        self.turn.output.append(item)
        self.open.append(item)
        return self.event(
            "response.output_item.added",
            output_index=len(self.turn.output) - 1,
            item={**item, "status": "in_progress"},
        )

    def text(self, piece: str) -> list[str]:
        events = []
        if self.message is None:
            self.message = it.message_item("")
            self.message["content"] = []
            events.append(self._add(self.message))
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            self.message["content"].append(part)
            events.append(
                self.event(
                    "response.content_part.added",
                    item_id=self.message["id"],
                    output_index=self._index(self.message),
                    content_index=0,
                    part=dict(part),
                )
            )
        self.message["content"][0]["text"] += piece
        events.append(
            self.event(
                "response.output_text.delta",
                item_id=self.message["id"],
                output_index=self._index(self.message),
                content_index=0,
                delta=piece,
                logprobs=[],
            )
        )
        return events

    def call(self, delta: Any) -> list[str]:
        name = delta.function.name if delta.function else None
        fragment = delta.function.arguments if delta.function else None
        if delta.index in self.held_calls or (delta.index not in self.calls and name in self.held):
            held_name, arguments = self.held_calls.get(delta.index, (name or "", ""))
            self.held_calls[delta.index] = (held_name, arguments + (fragment or ""))
            return []
        events = []
        item = self.calls.get(delta.index)
        if item is None:
            item = it.function_call_item(delta.id or "", name or "", "")
            self.calls[delta.index] = item
            events.append(self._add(item))
        if fragment:
            item["arguments"] += fragment
            events.append(
                self.event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self._index(item),
                    delta=fragment,
                )
            )
        return events

    def close(self, annotations: list[dict[str, Any]] | None = None) -> list[str]:
        """Done events for every item still open; `annotations` cite in the message."""
        events = []
        for item in self.open:
            index = self._index(item)
            if item is self.message:
                part = item["content"][0]
                part["annotations"] = list(annotations or [])
                common = {"item_id": item["id"], "output_index": index, "content_index": 0}
                events.append(
                    self.event(
                        "response.output_text.done", text=part["text"], logprobs=[], **common
                    )
                )
                events.append(self.event("response.content_part.done", part=part, **common))
            else:
                events.append(
                    self.event(
                        "response.function_call_arguments.done",
                        item_id=item["id"],
                        output_index=index,
                        name=item["name"],
                        arguments=item["arguments"],
                    )
                )
            events.append(self.event("response.output_item.done", output_index=index, item=item))
        self.open = []
        return events

    def _index(self, item: dict[str, Any]) -> int:
        return next(i for i, other in enumerate(self.turn.output) if other is item)


async def _guarded(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A failure after the 200: an `error` event, which the openai client raises. The inner
    stream is closed when this one is (a client gone), so its generations' cleanup runs then
    rather than whenever the garbage collector gets to it."""
    try:
        async with contextlib.aclosing(events) as inner:
            async for piece in inner:
                yield piece
    except (SoraiError, APIError) as exc:
        yield "event: error\n" + error_event(exc)


@router.get("/v1/responses/{response_id}")
async def get_response(request: Request, response_id: str) -> Response:
    return JSONResponse(_stored(request, response_id).response)


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> Response:
    if not response_store(request).delete(response_id):
        raise _not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    request: Request,
    response_id: str,
    order: str = "desc",
    limit: int = 20,
    after: str | None = None,
) -> Response:
    if order not in ("asc", "desc"):
        raise bad_request(f"order must be 'asc' or 'desc', got {order!r}", param="order")
    data = list(_stored(request, response_id).input_items)
    if order == "desc":
        data.reverse()
    return list_page(data, limit, after, "input item")


def _stored(request: Request, response_id: str) -> StoredResponse:
    stored = response_store(request).get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored


def _not_found(response_id: str) -> APIError:
    return APIError(
        404,
        f"no stored response has the id {response_id!r}",
        param="response_id",
        code="response_not_found",
    )
