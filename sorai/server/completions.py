"""POST /v1/completions: raw prompts, one engine request per prompt.

Choices are numbered prompt_index * n + j, as OpenAI numbers them for a list of prompts. With
`suffix`, a code model's fill-in-the-middle tokens frame each prompt (Tokenizer.encode_fim);
with best_of > n, best_of candidates are generated per prompt and the n whose tokens' summed
logprob is highest are returned.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from sorai.errors import SoraiError
from sorai.server.body import read_json
from sorai.server.errors import bad_request, from_sorai_error
from sorai.server.guided import checked, failed
from sorai.server.logprobs import CompletionLogprobsBuilder, TokenText
from sorai.server.models import route
from sorai.server.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
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
from sorai.server.runner import Generation, Job, unless_disconnected
from sorai.server.state import ServerState, get_state

router = APIRouter()


class _Reply:
    def __init__(
        self, body: CompletionRequest, model: str, candidates: int, prompt_texts: list[str]
    ):
        self.id = new_id("cmpl")
        self.created = int(time.time())
        self.model = model
        self.n = candidates  # choices generated per prompt
        self.returned = body.n or 1  # of which the best are returned (best_of)
        self.logprobs = body.logprobs is not None
        self.echo = bool(body.echo)
        self.include_usage = body.include_usage
        self.prompt_texts = prompt_texts
        self.choices = len(prompt_texts) * candidates

    def prompt_of(self, choice: int) -> str:
        return self.prompt_texts[choice // self.n]


def _encode(
    state: ServerState, prompt: str | list[int], suffix: str | None
) -> tuple[list[int], str]:
    """(ids, text) of one prompt; token ids must be inside the model's vocabulary."""
    tokenizer = state.engine.tokenizer
    if not isinstance(prompt, str):
        vocab = state.engine.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"prompt token ids must be in [0, {vocab}), got {bad}", "prompt")
    text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    if suffix:
        try:
            return tokenizer.encode_fim(prompt, suffix), text
        except SoraiError as exc:
            raise from_sorai_error(exc) from None
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    else:
        ids = list(prompt)
    if not ids:
        raise bad_request("the prompt is empty: give at least one token", "prompt")
    return ids, text


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    arrival = time.perf_counter()
    state = get_state(request)
    body = await read_json(request, CompletionRequest)
    body.check()
    state, model = await route(request, body.model, body.keep_alive)  # -m A -m B: A or B
    guided, guided_param = body.guided()
    jobs: list[Job] = []
    texts: list[str] = []
    fim = state.engine.tokenizer.fim_tokens if body.suffix else None
    for prompt in body.prompts():
        ids, text = _encode(state, prompt, body.suffix)
        params = body.sampling_params(len(ids), state.engine.context_length, guided)
        params = state.with_adapter(params, model)
        if fim is not None and fim.end:
            # The middle ends with the convention's own token (CodeLlama's <EOT>), not EOS.
            stop_ids = params.stop_token_ids + fim.end
            params = dataclasses.replace(params, stop_token_ids=stop_ids)
        jobs.append((ids, params))
        texts.append(text)
    reply = _Reply(body, model, jobs[0][1].n, texts)
    generation = Generation(state, jobs, reply.id, arrival)
    with checked(guided_param):
        generation.check()
    await unless_disconnected(request, generation.start())
    if body.stream:
        stream = _stream(reply, generation, state.token_text)
        return EventStream(guarded(stream), on_close=generation.close)
    try:
        return await unless_disconnected(request, _collect(reply, generation, state.token_text))
    finally:
        await generation.close()


async def _collect(reply: _Reply, generation: Generation, token_text: TokenText) -> Response:
    count = reply.choices
    texts: list[list[str]] = [[reply.prompt_of(c)] if reply.echo else [] for c in range(count)]
    logprobs = [CompletionLogprobs() if reply.logprobs else None for _ in range(count)]
    builders = [CompletionLogprobsBuilder(token_text) for _ in range(count)]
    finish: list[str | None] = [None] * count
    scores = [0.0] * count  # summed token logprobs, which best_of ranks by
    stop_reasons: list[str | int | None] = [None] * count
    tally = UsageTally(len(reply.prompt_texts))
    async for i, output in generation.outputs():
        tally.add(i, output)
        for delta in output.choices:
            failed(delta)
            c = i * reply.n + delta.index
            stop_reasons[c] = delta.stop_reason
            texts[c].append(delta.text)
            if delta.logprobs:
                scores[c] += sum(entry.logprob for entry in delta.logprobs)
                if logprobs[c] is not None:
                    builders[c].add(delta.logprobs, logprobs[c])
            if delta.finish_reason is not None:
                finish[c] = delta.finish_reason
    if "abort" in finish or None in finish:
        raise generation.aborted()
    choices = []
    for p in range(len(reply.prompt_texts)):
        candidates = list(range(p * reply.n, (p + 1) * reply.n))
        if reply.returned < reply.n:
            # sorted() is stable: equal scores keep the order they were generated in.
            candidates = sorted(candidates, key=lambda c: -scores[c])[: reply.returned]
        for j, c in enumerate(candidates):
            choices.append(
                CompletionChoice(
                    index=p * reply.returned + j,
                    text="".join(texts[c]),
                    logprobs=logprobs[c],
                    finish_reason=finish[c],
                    stop_reason=stop_reasons[c],
                )
            )
    return json_response(
        CompletionResponse(
            id=reply.id,
            created=reply.created,
            model=reply.model,
            choices=choices,
            usage=tally.usage(),
        )
    )


async def _stream(
    reply: _Reply, generation: Generation, token_text: TokenText
) -> AsyncIterator[str]:
    exclude = None if reply.include_usage else {"usage"}

    def chunk(choice: CompletionChoice) -> str:
        return sse(
            CompletionChunk(
                id=reply.id, created=reply.created, model=reply.model, choices=[choice]
            ),
            exclude=exclude,
        )

    if reply.echo:
        for c in range(reply.choices):
            yield chunk(CompletionChoice(index=c, text=reply.prompt_of(c), finish_reason=None))
    builders = [CompletionLogprobsBuilder(token_text) for _ in range(reply.choices)]
    tally = UsageTally(len(reply.prompt_texts))
    async for i, output in generation.outputs():
        tally.add(i, output)
        for delta in output.choices:
            if delta.finish_reason == "abort":
                raise generation.aborted()
            failed(delta)
            c = i * reply.n + delta.index
            logprobs = None
            if reply.logprobs and delta.logprobs:
                logprobs = builders[c].add(delta.logprobs, CompletionLogprobs())
            if not delta.text and delta.finish_reason is None and logprobs is None:
                continue
            yield chunk(
                CompletionChoice(
                    index=c,
                    text=delta.text,
                    logprobs=logprobs,
                    finish_reason=delta.finish_reason,
                    stop_reason=delta.stop_reason,
                )
            )
    if reply.include_usage:
        yield sse(
            CompletionChunk(
                id=reply.id,
                created=reply.created,
                model=reply.model,
                choices=[],
                usage=tally.usage(),
            )
        )
    yield DONE
