"""POST /v1/chat/completions.

Tools (sorai/server/tools.py over sorai/engine/tools.py) and output constraints
(GuidedSpec.from_fields of sorai/engine/params.py, via sorai/server/guided.py) are settled before
the prompt is built. The prompt is the messages through the one chat renderer
(sorai/model/chat.py, which `sorai train` renders its chat records with too); with tools active,
each choice's text goes through the request's ToolSetup (whole answers) or a ToolStream
(streams) to become content or tool calls.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from sorai.engine.images import PromptImage, expand_image_tokens
from sorai.engine.outputs import ChoiceDelta
from sorai.engine.params import SamplingParams
from sorai.server.body import read_json
from sorai.server.guided import checked, failed
from sorai.server.logprobs import TokenText, chat_logprobs
from sorai.server.models import route
from sorai.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    DeltaMessage,
)
from sorai.server.responses import (
    DONE,
    EventStream,
    UsageTally,
    guarded,
    json_response,
    new_id,
    sse,
)
from sorai.server.runner import Generation, unless_disconnected
from sorai.server.state import ServerState, get_state
from sorai.server.tools import ToolSetup, ToolStream, api_errors
from sorai.server.vision import MarkTable, image_inputs, render_images

router = APIRouter()


class _Reply:
    """One chat request's identity and options, shared by the streamed and whole answers."""

    def __init__(
        self,
        body: ChatCompletionRequest,
        model: str,
        n: int,
        token_text: TokenText,
        tools: ToolSetup,
    ):
        self.id = new_id("chatcmpl")
        self.created = int(time.time())
        self.model = model
        self.n = n
        self.logprobs = bool(body.logprobs)
        self.include_usage = body.include_usage
        self.token_text = token_text
        self.tools = tools
        self.marks: MarkTable | None = None  # set_of_marks: the images' marks (not streamed)

    def logprobs_of(self, entries: list | None) -> ChatLogprobs | None:
        if not self.logprobs:
            return None
        return ChatLogprobs(content=chat_logprobs(entries or [], self.token_text))


def prepare(
    state: ServerState, body: ChatCompletionRequest, model: str, format_param: str | None = None
) -> tuple[ToolSetup, list[int], SamplingParams, str | None]:
    """What a chat-shaped request runs on `state`'s engine: its tools, prompt ids and sampling
    (under the adapter the resolved `model` names), and the field a grammar error is blamed on.
    `format_param` names the response format's field where it is not response_format (the
    Responses API's text.format)."""
    tools = ToolSetup.from_request(body.tools, body.tool_choice, body.parallel_tool_calls)
    guided, guided_param = body.guided()
    if guided_param and format_param:
        guided_param = format_param
    with api_errors():
        guided = tools.constrain(guided, guided_param)
    if tools.forced:
        guided_param = "tools"
    prompt_ids = tools.encode(state.engine.tokenizer, body.messages)
    encoder = getattr(state.engine, "image_encoder", None)
    if encoder is not None:  # a vision model: one image token per patch
        prompt_ids = expand_image_tokens(
            prompt_ids, encoder.image_token_index, encoder.tokens_per_image
        )
    params = body.sampling_params(len(prompt_ids), state.engine.context_length, guided)
    return tools, prompt_ids, state.with_adapter(params, model), guided_param


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    arrival = time.perf_counter()
    state = get_state(request)
    body = await read_json(request, ChatCompletionRequest)
    body.check()
    state, model = await route(request, body.model, body.keep_alive)  # -m A -m B: A or B
    encoder = getattr(state.engine, "image_encoder", None)
    images: tuple[PromptImage, ...] = ()
    if encoder is not None and not body.set_of_marks:  # the images go to the vision tower
        image_text = state.engine.tokenizer.id_to_token(encoder.image_token_index) or ""
        images = await image_inputs(state.settings.media, body.messages, encoder, image_text)
        marks = None
    else:
        marks = await render_images(state.settings.media, body.messages, bool(body.set_of_marks))
    tools, prompt_ids, params, guided_param = prepare(state, body, model)
    if images:
        params = dataclasses.replace(params, images=images)
    reply = _Reply(body, model, params.n, state.token_text, tools)
    reply.marks = marks
    generation = Generation(state, [(prompt_ids, params)], reply.id, arrival)
    with checked(guided_param):
        generation.check()
    await unless_disconnected(request, generation.start())
    if body.stream:
        return EventStream(guarded(_stream(reply, generation)), on_close=generation.close)
    try:
        return await unless_disconnected(request, _collect(reply, generation))
    finally:
        await generation.close()


async def _collect(reply: _Reply, generation: Generation) -> Response:
    texts: list[list[str]] = [[] for _ in range(reply.n)]
    logprobs: list[list] = [[] for _ in range(reply.n)]
    finish: list[str | None] = [None] * reply.n
    stop_reasons: list[str | int | None] = [None] * reply.n
    tally = UsageTally(1)
    async for i, output in generation.outputs():
        tally.add(i, output)
        for delta in output.choices:
            failed(delta)
            stop_reasons[delta.index] = delta.stop_reason
            texts[delta.index].append(delta.text)
            if delta.logprobs:
                logprobs[delta.index] += delta.logprobs
            if delta.finish_reason is not None:
                finish[delta.index] = delta.finish_reason
    if "abort" in finish or None in finish:
        raise generation.aborted()
    choices = []
    for j in range(reply.n):
        content, calls, reason = reply.tools.answer("".join(texts[j]), finish[j])
        choices.append(
            ChatChoice(
                index=j,
                message=AssistantMessage(content=content, tool_calls=calls),
                logprobs=reply.logprobs_of(logprobs[j]),
                finish_reason=reason,
                stop_reason=stop_reasons[j],
            )
        )
    response = ChatCompletionResponse(
        id=reply.id,
        created=reply.created,
        model=reply.model,
        choices=choices,
        usage=tally.usage(),
    )
    if reply.marks is not None:
        return reply.marks.response(response, ["".join(t) for t in texts])
    return json_response(response)


async def _stream(reply: _Reply, generation: Generation) -> AsyncIterator[str]:
    # `usage` is null on every chunk but the last when the client asked for usage, and absent
    # otherwise, as in OpenAI's stream.
    exclude = None if reply.include_usage else {"usage"}

    def chunk(choices: list[ChatChunkChoice]) -> str:
        return sse(
            ChatCompletionChunk(
                id=reply.id, created=reply.created, model=reply.model, choices=choices
            ),
            exclude=exclude,
        )

    for j in range(reply.n):
        yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content=""))])
    tally = UsageTally(1)
    tool_streams = [reply.tools.stream() for _ in range(reply.n)] if reply.tools.active else None
    async for i, output in generation.outputs():
        tally.add(i, output)
        for delta in output.choices:
            if delta.finish_reason == "abort":
                raise generation.aborted()
            failed(delta)
            if tool_streams is not None:
                for piece in _tool_pieces(reply, tool_streams[delta.index], delta):
                    yield chunk([piece])
                continue
            logprobs = reply.logprobs_of(delta.logprobs) if delta.logprobs else None
            if not delta.text and delta.finish_reason is None and logprobs is None:
                continue  # e.g. the first bytes of a character still being held back
            yield chunk(
                [
                    ChatChunkChoice(
                        index=delta.index,
                        delta=DeltaMessage(content=delta.text or None),
                        logprobs=logprobs,
                        finish_reason=delta.finish_reason,
                        stop_reason=delta.stop_reason,
                    )
                ]
            )
    if reply.include_usage:
        yield sse(
            ChatCompletionChunk(
                id=reply.id,
                created=reply.created,
                model=reply.model,
                choices=[],
                usage=tally.usage(),
            )
        )
    yield DONE


def _tool_pieces(reply: _Reply, stream: ToolStream, delta: ChoiceDelta) -> list[ChatChunkChoice]:
    """One engine delta of a choice whose answer may be a tool call -> its chunk choices.

    Logprobs wait for the next chunk of their choice (a held-back piece of text has none).
    """
    stream.pending_logprobs += delta.logprobs or []
    messages = stream.feed(delta.text) if delta.text else []
    finish_reason = None
    if delta.finish_reason is not None:
        more, finish_reason = stream.finish(delta.finish_reason)
        messages += more
        messages.append(DeltaMessage())  # the closing chunk carries only finish_reason
    pieces = []
    for k, message in enumerate(messages):
        logprobs = None
        if stream.pending_logprobs and reply.logprobs:
            logprobs = reply.logprobs_of(stream.pending_logprobs)
            stream.pending_logprobs = []
        last = k == len(messages) - 1
        pieces.append(
            ChatChunkChoice(
                index=delta.index,
                delta=message,
                logprobs=logprobs,
                finish_reason=finish_reason if last else None,
                stop_reason=delta.stop_reason if last else None,
            )
        )
    return pieces
