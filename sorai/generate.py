"""Single-stream generation: the object `sorai.load` returns (generate, chat and their streams).

One request at a time over a contiguous KV cache; the serving engine batches many.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sorai.engine.guided import GrammarCompiler, advance, mask_logits
from sorai.engine.params import GUIDED_FIELDS, GuidedSpec, SamplingParams
from sorai.engine.sampler import SequenceState, process_logits, sample
from sorai.engine.stop import StopStringMatcher
from sorai.engine.tools import ToolSetup
from sorai.errors import ContextLengthError, SoraiError
from sorai.model.kv_cache import ContiguousKVCache
from sorai.model.tokenizer import IncrementalDetokenizer, Tokenizer
from sorai.model.transformer import Transformer
from sorai.model.weights import save_hf_dir

# Long prompts are prefilled in chunks so activations stay small whatever the prompt length.
PREFILL_CHUNK = 512

Messages = Sequence[dict[str, Any]]


def _constraint_source(options: dict[str, Any]) -> str:
    """The option a chat's output constraint came from, for error messages."""
    return GuidedSpec.from_fields(options)[1] or "sampling.guided"


@dataclass
class Delta:
    """One step of a stream: new text (may be empty), its token, and why the stream ended."""

    text: str
    token_id: int | None = None
    finish_reason: str | None = None  # "stop" or "length" on the last delta


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    # seconds: "prefill" (until the first token), "total"
    timings: dict[str, float] = field(default_factory=dict)
    # The calls of a chat answer given tools, in OpenAI's shape ({"id", "type": "function",
    # "function": {"name", "arguments": JSON text}}); None when it calls none. `text` is
    # then the content before the calls ("" when there is none).
    tool_calls: list[dict[str, Any]] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class LLM:
    """A loaded model and tokenizer, ready to generate."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, name: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self._grammars: GrammarCompiler | None = None

    def _matcher(self, params: SamplingParams) -> Any:
        if params.guided is None:
            return None
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.model.config.vocab_size)
        return self._grammars.matcher(params.guided)

    @property
    def context_length(self) -> int:
        return self.model.config.context_length

    def params(self, sampling: SamplingParams | None = None, **options: Any) -> SamplingParams:
        """SamplingParams from keyword options (unknown names and bad values raise).

        Besides SamplingParams' fields, the options take OpenAI's `response_format` and the
        extras guided_json / guided_regex / guided_choice / guided_grammar.
        """
        if sampling is not None and options:
            raise TypeError("pass either a SamplingParams or keyword options, not both")
        if sampling is not None:
            return sampling
        constraint = {k: options.pop(k) for k in GUIDED_FIELDS if k in options}
        if constraint:
            options["guided"] = GuidedSpec.from_request(**constraint)
        return SamplingParams.from_options(options)

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """Text is tokenized (with BOS where the model wants one); token ids are checked."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        vocab = self.model.config.vocab_size
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
            raise SoraiError(f"a prompt is a string or a list of token ids, got {prompt!r:.60}")
        for token in prompt:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise SoraiError(
                    f"prompt token ids must be integers in [0, {vocab}), got {token!r}"
                )
        return list(prompt)

    def save(self, path: str | os.PathLike) -> None:
        """Write the model as a Hugging Face directory (safetensors, config, tokenizer)."""
        save_hf_dir(self.model, Path(path))
        self.tokenizer.save(Path(path))

    # -- public API: whole results ------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], **options: Any) -> Completion:
        """Continue `prompt` (text, or token ids) and return the whole completion."""
        return self._collect(self.encode_prompt(prompt), self.params(**options))

    def chat(
        self,
        messages: Messages,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        **options: Any,
    ) -> Completion:
        """Answer the conversation `messages` ([{"role": ..., "content": ...}, ...]).

        tools, tool_choice and parallel_tool_calls are OpenAI's (see sorai/tools.py): the
        answer's calls come back as `tool_calls`, with finish_reason "tool_calls". Messages
        may carry earlier calls (assistant `tool_calls`) and their results (role "tool").
        """
        setup = ToolSetup.from_request(tools, tool_choice, parallel_tool_calls)
        params = self.params(**options)
        forced = setup.constrain(params.guided, _constraint_source(options))
        if forced is not params.guided:
            params = dataclasses.replace(params, guided=forced)
        completion = self._collect(setup.encode(self.tokenizer, messages), params)
        if setup.active:
            content, calls, reason = setup.answer(completion.text, completion.finish_reason)
            completion.text = content or ""
            completion.tool_calls = calls
            completion.finish_reason = reason or completion.finish_reason
        return completion

    # -- public API: streams of text pieces ---------------------------------------------------

    def generate_stream(self, prompt: str | Sequence[int], **options: Any) -> Iterator[str]:
        ids, params = self.encode_prompt(prompt), self.params(**options)
        return (d.text for d in self.stream_deltas(ids, params) if d.text)

    def chat_stream(self, messages: Messages, **options: Any) -> Iterator[str]:
        ids, params = ToolSetup().encode(self.tokenizer, messages), self.params(**options)
        return (d.text for d in self.stream_deltas(ids, params) if d.text)

    # -- the loop -----------------------------------------------------------------------------

    def check_length(self, prompt_ids: Sequence[int]) -> None:
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= self.context_length:
            raise ContextLengthError(
                f"the prompt is {len(prompt_ids)} tokens but {self.name or 'the model'} has a "
                f"context window of {self.context_length} tokens (room is needed for at least "
                "one new token); shorten the prompt"
            )

    def stream_deltas(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[Delta]:
        """Generate token by token. The last delta carries finish_reason."""
        self.check_length(prompt_ids)
        # max_tokens is capped by the room left in the context window (finish_reason "length").
        budget = min(params.max_tokens, self.context_length - len(prompt_ids))
        model = self.model
        cache = ContiguousKVCache.for_model(
            model, len(prompt_ids) + budget, initial_len=len(prompt_ids) + min(budget, 256)
        )
        state = SequenceState(
            params,
            prompt_ids,
            model.config.vocab_size,
            eos_token_ids=self.tokenizer.eos_token_ids,
            device=model.device,
        )
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids=prompt_ids)
        stopper = StopStringMatcher(params.stop)
        matcher = self._matcher(params)
        finish_reason = "length"
        with torch.inference_mode():
            ids = torch.tensor(prompt_ids, device=model.device)
            for start in range(0, len(ids), PREFILL_CHUNK):
                chunk = ids[start : start + PREFILL_CHUNK]
                positions = torch.arange(start, start + len(chunk), device=model.device)
                logits = model(chunk[None], positions, cache, last_only=True)[:, -1]
            position = len(prompt_ids)
            for _ in range(budget):
                logits = logits.float()
                if matcher is not None:
                    mask_logits(logits, [matcher])
                token = sample(process_logits(logits, [state]), [state])
                token_id = int(token)
                state.append(token_id)
                done = matcher is not None and advance(matcher, token_id)
                if token_id in state.stop_token_ids:
                    finish_reason = "stop"
                    break
                text, stopped = stopper.feed(detokenizer.add(token_id))
                yield Delta(text, token_id)
                if stopped or done:
                    finish_reason = "stop"
                    break
                positions = torch.tensor([position], device=model.device)
                logits = model(token.view(1, 1), positions, cache)[:, -1]
                position += 1
        tail = ""
        if not stopper.stopped:
            tail, _ = stopper.feed(detokenizer.flush())
            tail += stopper.flush()
        yield Delta(tail, None, finish_reason)

    def _collect(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        pieces, token_ids = [], []
        started = time.perf_counter()
        first_token_at = None
        finish_reason = "length"
        for delta in self.stream_deltas(prompt_ids, params):
            if first_token_at is None:
                first_token_at = time.perf_counter()
            pieces.append(delta.text)
            if delta.token_id is not None:
                token_ids.append(delta.token_id)
            finish_reason = delta.finish_reason or finish_reason
        ended = time.perf_counter()
        timings = {"prefill": (first_token_at or ended) - started, "total": ended - started}
        return Completion("".join(pieces), token_ids, len(prompt_ids), finish_reason, timings)
