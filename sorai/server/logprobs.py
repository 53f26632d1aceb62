"""The engine's TokenLogprob lists in OpenAI's two shapes: chat's and legacy completions'."""

from __future__ import annotations

import math

from sorai.engine.outputs import TokenLogprob
from sorai.model.tokenizer import Tokenizer
from sorai.server.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob

# JSON has no -Infinity; vLLM reports the same floor for a token the model rules out.
_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob > _FLOOR else _FLOOR


class TokenText:
    """A token's own text, tokenizer.decode([id]), and its raw bytes, memoized: logprobs ask
    for the same ids over and over."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id])
            self._cache[token_id] = text
        return text

    def bytes(self, token_id: int) -> list[int]:
        raw = self._bytes.get(token_id)
        if raw is None:
            raw = list(self._tokenizer.token_bytes(token_id))
            self._bytes[token_id] = raw
        return raw


def _top(token_text: TokenText, token_id: int, logprob: float) -> TopLogprob:
    return TopLogprob(
        token=token_text(token_id), logprob=_finite(logprob), bytes=token_text.bytes(token_id)
    )


def chat_logprobs(entries: list[TokenLogprob], token_text: TokenText) -> list[ChatTokenLogprob]:
    out = []
    for entry in entries:
        sampled = _top(token_text, entry.token_id, entry.logprob)
        out.append(
            ChatTokenLogprob(
                **sampled.model_dump(),
                top_logprobs=[_top(token_text, tid, lp) for tid, lp in entry.top],
            )
        )
    return out


class CompletionLogprobsBuilder:
    """Legacy completions logprobs for one choice, built across streamed deltas so that
    text_offset keeps counting from where the previous chunk ended."""

    def __init__(self, token_text: TokenText, offset: int = 0) -> None:
        self._token_text = token_text
        self._offset = offset

    def add(self, entries: list[TokenLogprob], into: CompletionLogprobs) -> CompletionLogprobs:
        for entry in entries:
            text = self._token_text(entry.token_id)
            into.tokens.append(text)
            into.token_logprobs.append(_finite(entry.logprob))
            top = {self._token_text(tid): _finite(lp) for tid, lp in entry.top}
            # The sampled token is always listed, as OpenAI and vLLM do.
            top.setdefault(text, _finite(entry.logprob))
            into.top_logprobs.append(top)
            into.text_offset.append(self._offset)
            self._offset += len(text)
        return into
