"""A request and its sequences (one per choice of `n`): tokens, KV blocks and output state."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sorai.engine.outputs import ChoiceDelta, TokenLogprob
from sorai.engine.params import GuidedSpec, SamplingParams
from sorai.engine.sampler import SequenceState
from sorai.engine.stop import StopStringMatcher
from sorai.model.tokenizer import IncrementalDetokenizer, Tokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One choice: the tokens so far, how many have keys and values, and where they live."""

    request: Request
    index: int
    token_ids: list[int]
    state: SequenceState
    detokenizer: IncrementalDetokenizer
    stopper: StopStringMatcher
    max_len: int  # prompt + max_tokens, capped by the context window
    status: Status = Status.WAITING
    num_computed: int = 0  # leading tokens whose keys and values are in the cache
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # of the full blocks, as a chain
    num_registered: int = 0  # leading blocks named in the prefix cache
    # Output produced since the last RequestOutput.
    pending_text: str = ""
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    reported_finish: bool = False
    matcher: Any = None  # llguidance matcher when the request is guided
    budget: Any = None  # its Budget (sorai/engine/guided/budget.py): max_tokens and loop guard
    error: str | None = None  # why guided decoding failed (finish_reason "error")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def hash_tokens(self) -> list[int]:
        """What the prefix cache hashes: the tokens, image tokens keyed by their image."""
        keys = self.request.hash_prompt
        return self.token_ids if keys is None else keys + self.token_ids[len(keys) :]

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - len(self.request.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take_delta(self) -> ChoiceDelta | None:
        """What changed since the last call, or None if nothing did."""
        report_finish = self.finished and not self.reported_finish
        if not (self.pending_text or self.pending_ids or report_finish):
            return None
        delta = ChoiceDelta(
            index=self.index,
            text=self.pending_text,
            token_ids=self.pending_ids,
            logprobs=self.pending_logprobs if self.request.params.logprobs is not None else None,
            finish_reason=self.finish_reason if report_finish else None,
            stop_reason=self.stop_reason if report_finish else None,
            error=self.error if report_finish else None,
        )
        self.pending_text, self.pending_ids, self.pending_logprobs = "", [], []
        self.reported_finish = self.reported_finish or report_finish
        return delta

    def append(
        self,
        token_id: int,
        logprob: TokenLogprob | None,
        grammar_done: bool = False,
        error: str | None = None,
    ) -> None:
        """Take a sampled token: record it, detokenize it and check every stop condition
        (grammar_done: the guided output is complete, nothing may follow; error: the guided
        decoding failed, the choice ends with finish_reason "error")."""
        self.token_ids.append(token_id)
        self.state.append(token_id)
        # A guided output that followed its shortest completion says so (vLLM's stop_reason).
        closed = "budget" if self.budget is not None and self.budget.closing else None
        if error is not None:
            self.error = error
            self._finish("error", None)
            return
        if token_id in self.state.stop_token_ids:
            # The stop token itself is neither text nor a listed output token (as OpenAI).
            explicit = token_id in self.request.params.stop_token_ids
            self._finish("stop", token_id if explicit else closed)
            return
        self.pending_ids.append(token_id)
        if logprob is not None:
            self.pending_logprobs.append(logprob)
        text, stopped = self.stopper.feed(self.detokenizer.add(token_id))
        self.pending_text += text
        if stopped:
            self._finish("stop", self.stopper.matched)
        elif grammar_done:
            self._finish("stop", closed)
        elif self.num_tokens >= self.max_len:
            self._finish("length", None)

    def _finish(self, reason: str, stop_reason: str | int | None) -> None:
        if not self.stopper.stopped:  # a matched stop string drops whatever follows it
            tail, stopped = self.stopper.feed(self.detokenizer.flush())
            self.pending_text += tail + ("" if stopped else self.stopper.flush())
            if stopped:
                reason, stop_reason = "stop", self.stopper.matched
        self.finish_reason, self.stop_reason = reason, stop_reason

    def abort(self) -> None:
        if not self.finished:
            self.finish_reason = "abort"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    sequences: list[Sequence] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens the first scheduled sequence found in the cache
    cache_checked: bool = False
    adapter: Any = None  # its AdapterEntry (sorai.engine.adapters) under a LoRA adapter
    adapter_admitted: bool = False  # the adapter holds a slot for it
    cache_salt: bytes = b""  # keys its KV blocks in the prefix cache (the adapter's)
    # Its images' places in the prompt (sorai.engine.images.ImageSpan), and the prompt as the
    # prefix cache hashes it (None: the prompt itself, when there are no images).
    image_spans: list[Any] = field(default_factory=list)
    hash_prompt: list[int] | None = None

    @property
    def lora_slot(self) -> int:
        """The adapter slot its tokens run with; -1: the base model."""
        return self.adapter.slot if self.adapter is not None else -1

    @classmethod
    def create(
        cls,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        vocab_size: int,
        max_len: int,
        arrival: float,
        device: object,
        new_matcher: Callable[[GuidedSpec], Any] | None = None,
        new_budget: Callable[[GuidedSpec], Any] | None = None,
    ) -> Request:
        request = cls(request_id, list(prompt_ids), params, arrival)
        for i in range(params.n):
            # Each choice samples on its own; a seed gives choice i the stream seed + i, so
            # the choices differ but the request as a whole is reproducible.
            choice_params = params
            if params.seed is not None and i:
                choice_params = replace(params, seed=(params.seed + i) % 2**64)
            state = SequenceState(
                choice_params,
                prompt_ids,
                vocab_size,
                eos_token_ids=tokenizer.eos_token_ids,
                device=device,
            )
            request.sequences.append(
                Sequence(
                    request=request,
                    index=i,
                    token_ids=list(prompt_ids),
                    state=state,
                    detokenizer=IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids),
                    stopper=StopStringMatcher(params.stop),
                    max_len=max_len,
                    matcher=new_matcher(params.guided) if params.guided and new_matcher else None,
                    budget=new_budget(params.guided) if params.guided and new_budget else None,
                )
            )
        return request

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)
