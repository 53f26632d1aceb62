"""A scripted stand-in for AsyncEngine: same interface, no model, every path on demand.

It answers each choice with the tokens of REPLY (choice j starts j tokens in, so choices
differ), one token per step, and can be told to refuse requests (queue full, dead) or to abort
them mid-way, which the real engine only does under load or at shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from sorai.engine.outputs import ChoiceDelta, EngineStats, RequestOutput, TokenLogprob
from sorai.engine.params import SamplingParams
from sorai.errors import ContextLengthError, EngineDeadError, SamplingError
from sorai.model.runtime import Runtime
from sorai.model.tokenizer import Tokenizer

REPLY = " The quick brown fox jumps over the lazy dog. It was a sunny day in the park."


class FakeEngine:
    model_name = "fake-model"
    runtime = Runtime("cpu", "float32", "none (a scripted engine)", "this machine")

    def __init__(self, tokenizer: Tokenizer, context_length: int = 256) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.vocab_size = tokenizer.vocab_size
        self.reply_ids = tokenizer.encode(REPLY)
        self.dead = False
        self.refuse: Exception | None = None  # raised by generate() at start
        self.abort_after: int | None = None  # steps after which every choice is aborted
        self.step_delay = 0.0
        self.active: set[str] = set()
        self.aborted: set[str] = set()  # told to abort: their streams end at the next step
        self.started = False
        self.stopped = False
        self.requests: list[tuple[list[int], SamplingParams, str]] = []

    async def start(self) -> None:
        self.started = True
        self.loop = asyncio.get_running_loop()  # the server's, for tests that act on it

    async def stop(self, timeout: float = 10.0) -> None:
        self.stopped = True

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise ContextLengthError(
                f"the prompt is {len(prompt_ids)} tokens and max_tokens is {params.max_tokens}: "
                f"{len(prompt_ids) + params.max_tokens} > the context window of "
                f"{self.context_length} tokens"
            )
        for token_id, _ in params.logit_bias:
            if token_id >= self.vocab_size:
                raise SamplingError(f"logit_bias names token {token_id}, past the vocabulary")

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.active), kv_blocks_total=100)

    async def abort(self, request_id: str) -> None:
        if request_id in self.active:
            self.aborted.add(request_id)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        if self.dead:
            raise EngineDeadError("the engine is dead")
        if self.refuse is not None:
            raise self.refuse
        self.requests.append((list(prompt_ids), params, request_id))
        self.active.add(request_id)
        try:
            produced = [0] * params.n
            finished = [False] * params.n
            step = 0
            while not all(finished):
                await asyncio.sleep(self.step_delay)
                step += 1
                deltas = []
                for j in range(params.n):
                    if finished[j]:
                        continue
                    told = request_id in self.aborted
                    if told or (self.abort_after is not None and step > self.abort_after):
                        finished[j] = True
                        deltas.append(ChoiceDelta(j, "", [], finish_reason="abort"))
                        continue
                    position = j + produced[j]
                    if position >= len(self.reply_ids) and not params.ignore_eos:
                        finished[j] = True
                        deltas.append(ChoiceDelta(j, "", [], finish_reason="stop"))
                        continue
                    token = self.reply_ids[position % len(self.reply_ids)]
                    produced[j] += 1
                    logprobs = None
                    if params.logprobs is not None:
                        top = [(token, -0.25)] + [(t, -2.0 - t / 1e5) for t in range(10, 40)]
                        logprobs = [TokenLogprob(token, -0.25, top[: params.logprobs])]
                    reason = "length" if produced[j] == params.max_tokens else None
                    finished[j] = reason is not None
                    deltas.append(
                        ChoiceDelta(
                            j,
                            self.tokenizer.decode([token]),
                            [token],
                            logprobs=logprobs,
                            finish_reason=reason,
                        )
                    )
                yield RequestOutput(
                    request_id,
                    deltas,
                    prompt_tokens=len(prompt_ids),
                    cached_tokens=0,
                    finished=all(finished),
                )
        finally:
            self.active.discard(request_id)
            self.aborted.discard(request_id)
