"""LLM: what `sorai.load` returns — generate, chat and their streams, in Python, over LLMEngine.

A thin facade: every request goes through the engine's scheduler, sampler, grammar mask and
per-token output handling, exactly as a request to `sorai serve` does. Single-threaded (the
caller's thread steps the engine); several streams may be open at once and are batched.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sorai.engine.config import EngineConfig
from sorai.engine.images import PromptImage, expand_image_tokens
from sorai.engine.llm_engine import LLMEngine
from sorai.engine.outputs import ChoiceDelta, RequestOutput, TokenLogprob
from sorai.engine.params import GUIDED_FIELDS, GuidedSpec, SamplingParams
from sorai.engine.tools import ToolSetup
from sorai.errors import SamplingError, SoraiError
from sorai.hub import DEFAULT_MODEL
from sorai.model.loader import load_pretrained
from sorai.model.lora import check_adapter_dir
from sorai.model.tokenizer import Tokenizer
from sorai.model.transformer import Transformer
from sorai.model.weights import save_hf_dir

Messages = Sequence[dict[str, Any]]
Prompt = str | Sequence[int]


@dataclass
class Completion:
    """One finished answer: its text and tokens, why it ended, and what it cost."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop", "length" (or "tool_calls" for a chat answer that calls tools)
    # seconds: "prefill" (until the first token), "total"
    timings: dict[str, float] = field(default_factory=dict)
    # The calls of a chat answer given tools, in OpenAI's shape ({"id", "type": "function",
    # "function": {"name", "arguments": JSON text}}); None when it calls none. `text` is
    # then the content before the calls ("" when there is none).
    tool_calls: list[dict[str, Any]] | None = None
    # The stop string or stop token id that ended it, when one did (as vLLM's stop_reason).
    stop_reason: str | int | None = None
    # One per token of token_ids when the request asked for `logprobs`.
    logprobs: list[TokenLogprob] | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def _constraint_source(options: dict[str, Any]) -> str:
    """The option a chat's output constraint came from, for error messages."""
    return GuidedSpec.from_fields(options)[1] or "sampling.guided"


class LLM:
    """A loaded model and tokenizer, ready to generate (see `sorai.load`)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._ids = itertools.count()
        # Outputs the engine produced for a stream other than the one being read.
        self._inbox: dict[str, deque[RequestOutput]] = {}

    @classmethod
    def from_model(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        adapter: str | os.PathLike | None = None,
        config: EngineConfig | None = None,
        progress: Callable[[str], None] | None = None,
        quantize: str = "auto",
        adapters: Mapping[str, str | os.PathLike] | None = None,
    ) -> LLM:
        """Load a model as `sorai.load` documents; `config` tunes the engine underneath."""
        for path in (adapters or {}).values():
            check_adapter_dir(path)  # a missing or broken directory fails before the load
        transformer, tokenizer, name = load_pretrained(
            model, dtype, device, adapter, progress, quantize=quantize
        )
        if config is None:
            config = facade_config(transformer, len(adapters or {}))
        llm = cls(LLMEngine(transformer, tokenizer, config, name=name))
        for adapter_name, path in (adapters or {}).items():
            llm.add_adapter(adapter_name, path)
        return llm

    # -- LoRA adapters --------------------------------------------------------------------

    def add_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Serve the PEFT adapter at `path` unmerged as `name`: requests pick it with
        `adapter=name` (generate, chat and their streams); the others run the base model."""
        self.engine.adapters.add(name, path)

    def remove_adapter(self, name: str) -> None:
        self.engine.adapters.remove(name)

    @property
    def adapters(self) -> dict[str, Path]:
        """{name: directory} of the adapters served unmerged."""
        return self.engine.adapters.names()

    # -- what was loaded ------------------------------------------------------------------

    @property
    def model(self) -> Transformer:
        return self.engine.model

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def name(self) -> str:
        return self.engine.model_name

    @property
    def context_length(self) -> int:
        """The longest prompt + completion a request may ask for (tokens)."""
        return self.engine.context_length

    def save(self, path: str | os.PathLike) -> None:
        """Write the model as a Hugging Face directory (safetensors, config, tokenizer)."""
        save_hf_dir(self.model, Path(path))
        self.tokenizer.save(Path(path))

    # -- requests -------------------------------------------------------------------------

    def params(self, sampling: SamplingParams | None = None, **options: Any) -> SamplingParams:
        """SamplingParams from keyword options (unknown names and bad values raise).

        Besides SamplingParams' fields, the options take OpenAI's `response_format` and the
        extras guided_json / guided_regex / guided_choice / guided_grammar.
        """
        if sampling is not None and options:
            raise TypeError("pass either a SamplingParams or keyword options, not both")
        if sampling is not None:
            return sampling
        names = (*GUIDED_FIELDS, "max_string_repeats")
        constraint = {k: options.pop(k) for k in names if k in options}
        if constraint:
            options["guided"] = GuidedSpec.from_request(**constraint)
        return SamplingParams.from_options(options)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Text is tokenized (with BOS where the model wants one); token ids are checked."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
            raise SoraiError(f"a prompt is a string or a list of token ids, got {prompt!r:.60}")
        vocab = self.engine.vocab_size
        for token in prompt:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise SoraiError(
                    f"prompt token ids must be integers in [0, {vocab}), got {token!r}"
                )
        return list(prompt)

    def encode_chat(self, messages: Messages) -> list[int]:
        """The prompt ids of a conversation, rendered as the server and `sorai train` render
        it (sorai/model/chat.py), ending with the assistant's turn to speak."""
        return ToolSetup().encode(self.tokenizer, messages)

    # -- whole results --------------------------------------------------------------------

    def generate(self, prompt: Prompt, **options: Any) -> Completion:
        """Continue `prompt` (text, or token ids) and return the whole completion."""
        return self._run([self.encode_prompt(prompt)], self.params(**options))[0]

    def generate_batch(self, prompts: Sequence[Prompt], **options: Any) -> list[Completion]:
        """Continue every prompt (texts or token-id lists) in one engine batch; the
        completions come back in the prompts' order. Each prompt is checked before any runs."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise SoraiError(f"prompts must be a list of prompts, got {prompts!r:.60}")
        params = self.params(**options)
        return self._run([self.encode_prompt(p) for p in prompts], params)

    def chat(
        self,
        messages: Messages,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        **options: Any,
    ) -> Completion:
        """Answer the conversation `messages` ([{"role": ..., "content": ...}, ...]).

        tools, tool_choice and parallel_tool_calls are OpenAI's (see sorai/model/chat.py): the
        answer's calls come back as `tool_calls`, with finish_reason "tool_calls". Messages
        may carry earlier calls (assistant `tool_calls`) and their results (role "tool").
        """
        setup = ToolSetup.from_request(tools, tool_choice, parallel_tool_calls)
        params = self.params(**options)
        forced = setup.constrain(params.guided, _constraint_source(options))
        if forced is not params.guided:
            params = dataclasses.replace(params, guided=forced)
        messages, images = self._take_images(messages)
        ids, params = self._image_prompt(setup.encode(self.tokenizer, messages), params, images)
        completion = self._run([ids], params)[0]
        if setup.active:
            content, calls, reason = setup.answer(completion.text, completion.finish_reason)
            completion.text = content or ""
            completion.tool_calls = calls
            completion.finish_reason = reason or completion.finish_reason
        return completion

    # -- images, for a vision-language checkpoint (docs/vision.md) -------------------------

    def _take_images(self, messages: Messages) -> tuple[Messages, list[Any]]:
        """`messages` with each {"type": "image", "image": PIL image} part replaced by the
        model's image token, and the images in order. A text-only model refuses them."""
        encoder = self.engine.image_encoder
        images: list[Any] = []
        out = []
        for message in messages:
            content = message.get("content") if isinstance(message, Mapping) else None
            if not isinstance(content, list) or not any(
                isinstance(p, Mapping) and p.get("type") == "image" for p in content
            ):
                out.append(message)
                continue
            if encoder is None:
                raise SoraiError(
                    f"model {self.name!r} takes no images (it has no vision tower); "
                    "read them with sorai.vision.ocr.read_text"
                )
            token = self.tokenizer.id_to_token(encoder.image_token_index) or ""
            parts = []
            for part in content:
                if isinstance(part, Mapping) and part.get("type") == "image":
                    images.append(part.get("image"))
                    parts.append({"type": "text", "text": token})
                else:
                    parts.append(part)
            out.append({**message, "content": parts})
        return out, images

    def _image_prompt(
        self, ids: list[int], params: SamplingParams, images: list[Any]
    ) -> tuple[list[int], SamplingParams]:
        """A vision model's prompt with one image token per patch, and `params` carrying the
        images, preprocessed; unchanged for a text-only model."""
        encoder = self.engine.image_encoder
        if encoder is None:
            return ids, params
        ids = expand_image_tokens(ids, encoder.image_token_index, encoder.tokens_per_image)
        if not images:
            return ids, params
        from PIL import Image

        prepared = []
        for k, image in enumerate(images, start=1):
            if not isinstance(image, Image.Image):
                raise SoraiError(
                    f"image part {k}: 'image' must be a PIL image, got {type(image).__name__}"
                )
            prepared.append(PromptImage.from_pixels(encoder.preprocess(image)))
        return ids, dataclasses.replace(params, images=tuple(prepared))

    # -- streams --------------------------------------------------------------------------

    def generate_stream(self, prompt: Prompt, **options: Any) -> Iterator[str]:
        """The completion of `prompt` as text pieces, as they are generated."""
        ids, params = self.encode_prompt(prompt), self.params(**options)
        return (d.text for d in self.stream_deltas(ids, params) if d.text)

    def chat_stream(self, messages: Messages, **options: Any) -> Iterator[str]:
        """The answer to `messages` as text pieces, as they are generated."""
        messages, images = self._take_images(messages)
        ids, params = self._image_prompt(self.encode_chat(messages), self.params(**options), images)
        return (d.text for d in self.stream_deltas(ids, params) if d.text)

    def stream_deltas(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[ChoiceDelta]:
        """The engine's deltas for one request; the last carries finish_reason.

        The request is checked (length, vocabulary, grammar) before the first delta, and
        aborted, its KV blocks freed, if the caller stops reading early.
        """
        request_id = self._add(prompt_ids, params)
        return self._deltas(request_id)

    # -- the loop -------------------------------------------------------------------------

    def _add(self, prompt_ids: Sequence[int], params: SamplingParams) -> str:
        if params.n != 1:
            raise SamplingError(
                f"n must be 1 here (got {params.n}): an LLM call returns one completion; use "
                "generate_batch() for several, or ask `sorai serve` for n choices"
            )
        request_id = f"llm-{next(self._ids)}"
        self.engine.add_request(request_id, prompt_ids, params)
        self._inbox[request_id] = deque()
        return request_id

    def _deltas(self, request_id: str) -> Iterator[ChoiceDelta]:
        for output in self._outputs(request_id):
            yield from output.choices

    def _outputs(self, request_id: str) -> Iterator[RequestOutput]:
        try:
            while True:
                output = self._next_output(request_id)
                for delta in output.choices:
                    if delta.finish_reason == "error":
                        raise SamplingError(delta.error or "guided decoding failed")
                yield output
                if output.finished:
                    return
        finally:
            if self._inbox.pop(request_id, None) is not None and request_id in self.engine.requests:
                self.engine.abort(request_id)
                # Step once so the aborted request gives its blocks back now, not at the next
                # call (which may never come).
                self._dispatch(self.engine.step())

    def _next_output(self, request_id: str) -> RequestOutput:
        inbox = self._inbox[request_id]
        while not inbox:
            self._dispatch(self.engine.step())
        return inbox.popleft()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            inbox = self._inbox.get(output.request_id)
            if inbox is not None:
                inbox.append(output)

    def _run(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Run every prompt as one engine request, batched, and collect each completion."""
        started = time.perf_counter()
        request_ids: list[str] = []
        try:
            for ids in prompts:
                request_ids.append(self._add(ids, params))
        except BaseException:
            for request_id in request_ids:
                self._inbox.pop(request_id, None)
                self.engine.abort(request_id)
            self._dispatch(self.engine.step())
            raise
        results = [_Collector(len(ids), started) for ids in prompts]
        streams = [self._outputs(request_id) for request_id in request_ids]
        pending = set(range(len(streams)))
        try:
            while pending:
                for i in sorted(pending):
                    output = next(streams[i], None)
                    if output is None:
                        pending.discard(i)
                    else:
                        results[i].add(output, time.perf_counter())
        finally:
            for stream in streams:
                stream.close()
        return [r.completion(time.perf_counter()) for r in results]


@dataclass
class _Collector:
    """Joins one request's deltas into a Completion."""

    prompt_tokens: int
    started: float
    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str = "length"
    stop_reason: str | int | None = None
    first_token_at: float | None = None
    cached_tokens: int = 0

    def add(self, output: RequestOutput, now: float) -> None:
        self.cached_tokens = output.cached_tokens
        for delta in output.choices:  # one: the facade asks for n = 1
            if self.first_token_at is None and delta.token_ids:
                self.first_token_at = now
            self.pieces.append(delta.text)
            self.token_ids += delta.token_ids
            if delta.logprobs is not None:
                self.logprobs = (self.logprobs or []) + delta.logprobs
            if delta.finish_reason is not None:
                self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason

    def completion(self, ended: float) -> Completion:
        prefill = (self.first_token_at or ended) - self.started
        return Completion(
            "".join(self.pieces),
            self.token_ids,
            self.prompt_tokens,
            self.finish_reason,
            timings={"prefill": prefill, "total": ended - self.started},
            stop_reason=self.stop_reason,
            logprobs=self.logprobs,
            cached_tokens=self.cached_tokens,
        )


def facade_config(model: Transformer, adapters: int = 0) -> EngineConfig:
    """The engine config for the Python API: EngineConfig's KV cache for one whole context
    window (so any prompt the model takes fits, capped by DEFAULT_KV_CACHE_GIB: a 128k-token
    window of a large model would otherwise claim tens of GiB); threads as the engine sets them
    (one core left free: measured on 2 cores, one thread decodes 3x faster than two whenever
    anything else runs)."""
    slots = max(adapters, EngineConfig.max_loras)  # every adapter given at load stays resident
    return EngineConfig(max_loras=slots)
