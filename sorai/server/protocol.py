"""The OpenAI API's request and response bodies (pydantic v2), and request -> engine inputs.

Requests are validated strictly (no "5" for 5, no true for 1) and ignore fields they do not
know, as OpenAI's do. The extra sampling fields that vLLM accepts (top_k, min_p,
repetition_penalty, min_tokens, stop_token_ids, ignore_eos, and the guided_* constraints) sit
at the top level, where the openai client's `extra_body` puts them. Ranges are checked by
SamplingParams, whose messages name the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from sorai.engine.params import GuidedSpec, SamplingParams
from sorai.server.errors import bad_request
from sorai.server.guided import guided_spec
from sorai.server.limits import (
    IMAGE_PART,
    MAX_BEST_OF,
    MAX_COMPLETION_LOGPROBS,
    MAX_TOP_LOGPROBS,
    MEDIA_PARTS,
    REFUSAL_PART,
    ROLES,
    TEXT_PARTS,
    check_range,
    check_stop,
    check_tools,
)

# Completions' legacy default, as in OpenAI's API (chat uses the rest of the context window).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# "function" (OpenAI's deprecated function calling) is read as "tool": see ChatMessage.
Role = Literal["system", "developer", "user", "assistant", "tool"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests --------------------------------------------------------------------------------


class StreamOptions(_Request):
    include_usage: bool | None = None


class ImageURL(_Request):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(_Request):
    # An image part is replaced by a text part (its OCR rendering, sorai/server/vision.py)
    # before the prompt is built.
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


_CONTENT_SHAPE = (
    'content is a string or a list of text parts ({"type": "text", "text": ...}) and image '
    'parts ({"type": "image_url", "image_url": {"url": ...}})'
)


class FunctionCallIn(_Request):
    name: str
    # A JSON text, as OpenAI sends it; an object is taken too.
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Request):
    """A call an earlier assistant turn made, as the client sends it back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns: the call this is the result of

    @model_validator(mode="before")
    @classmethod
    def _legacy_functions(cls, data: Any) -> Any:
        # OpenAI's deprecated function calling, as tool calling: an assistant `function_call`
        # is a tool call and a "function" message its result, both known by the function's
        # name (the legacy protocol has no call ids).
        if not isinstance(data, dict):
            return data
        role = data.get("role")
        if role == "function":
            name = data.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError("a function message needs 'name' (the function it answers)")
            data = {**data, "role": "tool", "tool_call_id": name}
        call = data.get("function_call")
        if role == "assistant" and isinstance(call, dict) and data.get("tool_calls") is None:
            data = {**data, "tool_calls": [{"id": call.get("name"), "function": call}]}
        return data

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, role: Any) -> Any:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}; got {_short(role)}")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, content: Any) -> Any:
        # By hand, for one clear message instead of pydantic's per-union-member errors.
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ValueError(f"{_CONTENT_SHAPE}; got {_short(content)}")
        parts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == IMAGE_PART:
                image = part.get("image_url")
                if isinstance(image, str):  # some clients send the URL itself
                    image = {"url": image}
                if not isinstance(image, dict) or not isinstance(image.get("url"), str):
                    raise ValueError(
                        f"content[{i}] is an image part without an 'image_url' object holding "
                        "a 'url' string (a data: URL, or a path or URL the server allows)"
                    )
                parts.append({**part, "image_url": image})
                continue
            if kind in MEDIA_PARTS:
                raise ValueError(
                    f"content[{i}] is of type {kind!r}, which this server does not read; "
                    "send text parts and image_url parts"
                )
            if kind == REFUSAL_PART and isinstance(part.get("refusal"), str):
                # An assistant turn's refusal, sent back: its text is what the model said.
                parts.append({"type": "text", "text": part["refusal"]})
                continue
            if kind not in TEXT_PARTS:
                raise ValueError(
                    f"content[{i}] has type {kind!r}, which is not a content part type "
                    f"(text, refusal, {', '.join(MEDIA_PARTS)}); {_CONTENT_SHAPE}"
                )
            if not isinstance(part.get("text"), str):
                raise ValueError(
                    f"content[{i}] is a text part without a 'text' string; {_CONTENT_SHAPE}"
                )
            parts.append(part)
        return parts

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        # Only an assistant turn may omit content (OpenAI allows it next to tool calls).
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs 'tool_call_id' (the id of the call it answers)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message may have 'tool_calls'")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        # Joined with newlines, as vLLM does for text-only models.
        return "\n".join(part.text or "" for part in self.content)

    def for_template(self) -> dict[str, str]:
        # "developer" is OpenAI's newer name for the system role; templates know "system".
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class _SamplingFields(_Request):
    """Fields both endpoints share, OpenAI's and the vLLM extras."""

    model: str | None = None
    # Ollama's: how long `model` stays loaded after this request (seconds or "5m"; 0 unloads
    # it after, negative keeps it); the server's --keep-alive when left out.
    keep_alive: int | float | str | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    # Structured outputs: OpenAI's response_format, or one of vLLM's guided_* extras.
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    max_string_repeats: Any = None  # the loop guard's bound (sorai's extra; checked by GuidedSpec)

    def guided(self) -> tuple[GuidedSpec | None, str | None]:
        """The requested output constraint and the field that asked for it (or None, None)."""
        return guided_spec(
            {
                "response_format": self.response_format,
                "guided_json": self.guided_json,
                "guided_regex": self.guided_regex,
                "guided_choice": self.guided_choice,
                "guided_grammar": self.guided_grammar,
                "max_string_repeats": self.max_string_repeats,
            }
        )

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_request(
                "stream_options is only allowed when stream is true", param="stream_options"
            )
        check_stop(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _sampling(
        self,
        max_tokens: int,
        logprobs: int | None,
        guided: GuidedSpec | None = None,
        n: int | None = None,
    ) -> SamplingParams:
        top_k = self.top_k
        if top_k == -1:  # vLLM's spelling of "off"
            top_k = 0
        return SamplingParams.from_options(
            {
                "max_tokens": max_tokens,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "top_k": top_k,
                "min_p": self.min_p,
                "repetition_penalty": self.repetition_penalty,
                "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty,
                "seed": self.seed,
                "stop": self.stop,
                "stop_token_ids": self.stop_token_ids,
                "ignore_eos": self.ignore_eos,
                "min_tokens": self.min_tokens,
                "n": n or self.n,
                "logprobs": logprobs,
                "logit_bias": self.logit_bias,
                "guided": guided,
            }
        )


def _remaining(prompt_len: int, context_length: int) -> int:
    # At least 1, so a prompt that fills the window fails the engine's length check with the
    # numbers in its message rather than as a max_tokens error.
    return max(1, context_length - prompt_len)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # sorai's extra: image parts read as numbered marks, and the answer's [n] mapped back to
    # boxes in the response's `set_of_marks` (sorai/server/vision.py).
    set_of_marks: bool | None = None

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise ValueError("messages must hold at least one message")
        return messages

    def check(self) -> None:
        """OpenAI's cross-field rules, and features this server refuses rather than ignores."""
        self._check_common()
        check_range("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        check_tools(self.tools)

    def sampling_params(
        self, prompt_len: int, context_length: int, guided: GuidedSpec | None = None
    ) -> SamplingParams:
        requested = self.max_completion_tokens
        if requested is None:
            requested = self.max_tokens
        if requested is None:
            requested = _remaining(prompt_len, context_length)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(requested, logprobs, guided)


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    max_tokens: int | None = COMPLETIONS_DEFAULT_MAX_TOKENS
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        # Checked by hand: pydantic's union errors ("Input should be a valid string" five
        # times) do not tell a user what a prompt may be.
        shape = (
            "a prompt is a string, a list of strings, a list of token ids or a list of lists "
            "of token ids"
        )
        if isinstance(prompt, str):
            return prompt
        if not isinstance(prompt, list) or not prompt:
            raise ValueError(f"{shape}; got {_short(prompt)}")
        if all(isinstance(p, str) for p in prompt):
            return prompt
        if all(_is_int(t) for t in prompt):
            return prompt
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return prompt
        raise ValueError(f"{shape} (none empty); got {_short(prompt)}")

    def check(self) -> None:
        self._check_common()
        check_range("logprobs", self.logprobs, 0, MAX_COMPLETION_LOGPROBS)
        n = self.n or 1
        check_range("best_of", self.best_of, 1, MAX_BEST_OF)
        if self.best_of is not None and self.best_of < n:
            raise bad_request(f"best_of must be >= n ({n}), got {self.best_of}", param="best_of")
        if self.candidates > n and self.stream:
            raise bad_request(
                "best_of > n cannot be streamed: the best choices are known only at the end",
                param="best_of",
            )
        if self.echo and self.logprobs is not None:
            raise bad_request(
                "echo with logprobs is not supported (prompt logprobs are not computed)",
                param="echo",
            )
        if self.echo and self.suffix:
            raise bad_request("echo cannot be combined with suffix", param="echo")

    @property
    def candidates(self) -> int:
        """Choices generated per prompt: best_of, of which the n most likely are returned."""
        return max(self.best_of or 1, self.n or 1)

    def prompts(self) -> list[str | list[int]]:
        """One entry per engine request: a text or a token-id list."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(_is_int(t) for t in prompt):
            return [list(prompt)]
        return list(prompt)

    def sampling_params(
        self, prompt_len: int, context_length: int, guided: GuidedSpec | None = None
    ) -> SamplingParams:
        requested = self.max_tokens
        if requested is None:
            requested = _remaining(prompt_len, context_length)
        if self.candidates > (self.n or 1):
            # Ranking the candidates needs each token's logprob.
            logprobs = self.logprobs or 0
            return self._sampling(requested, logprobs, guided, n=self.candidates)
        return self._sampling(requested, self.logprobs, guided)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class TokenizeRequest(_Request):
    """vLLM's /tokenize: either a prompt or chat messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# OpenAI's own limit on inputs per embeddings request.
MAX_EMBEDDING_INPUTS = 2048
EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(_Request):
    model: str | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        shape = (
            "input is a string, a list of strings, a list of token ids or a list of lists of "
            "token ids"
        )
        if isinstance(value, str):
            if not value:
                raise ValueError("input must not be an empty string")
            return value
        if not isinstance(value, list):
            raise ValueError(f"{shape}; got {_short(value)}")
        if not value:
            raise ValueError("input must hold at least one item")
        if len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(
                f"input may hold at most {MAX_EMBEDDING_INPUTS} items, got {len(value)}"
            )
        if all(isinstance(item, str) for item in value):
            empty = next((i for i, item in enumerate(value) if not item), None)
            if empty is not None:
                raise ValueError(f"input[{empty}] is an empty string; every input needs text")
            return value
        if all(_is_int(t) for t in value):
            return value
        if all(isinstance(item, list) and all(_is_int(t) for t in item) for item in value):
            empty = next((i for i, item in enumerate(value) if not item), None)
            if empty is not None:
                raise ValueError(f"input[{empty}] is an empty list; every input needs tokens")
            return value
        raise ValueError(f"{shape}; got {_short(value)}")

    def inputs(self) -> list[str] | list[list[int]]:
        """One entry per embedding: all texts, or all token-id lists."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if all(_is_int(t) for t in value):
            return [list(value)]  # type: ignore[arg-type]
        return list(value)  # type: ignore[arg-type]


# -- responses -------------------------------------------------------------------------------


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def make_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


def _without_none(data: dict[str, Any], keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None or (keys is not None and k not in keys)}


class FunctionCall(_Response):
    name: str
    arguments: str  # a JSON text


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler: Any) -> dict[str, Any]:
        # tool_calls appears only on an answer that calls tools, as in OpenAI's responses.
        return _without_none(handler(self), keys=("tool_calls",))


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    # vLLM's extra: the stop string or stop token id that ended the choice, or "budget" when a
    # guided output was closed early to end complete within max_tokens; listed only when set.
    stop_reason: str | int | None = None

    @model_serializer(mode="wrap")
    def _drop_no_stop_reason(self, handler: Any) -> dict[str, Any]:
        return _without_none(handler(self), keys=("stop_reason",))


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionCallDelta(_Response):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return _without_none(handler(self))


class ToolCallDelta(_Response):
    """A piece of a streamed tool call: the first names it (id, type, function.name), the
    rest carry argument fragments; `index` says which of the message's calls it extends."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return _without_none(handler(self))


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        # A delta lists only what it carries: {"content": "x"}, or {} on the closing chunk.
        return _without_none(handler(self))


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    # vLLM's extra: the stop string or stop token id that ended the choice, or "budget" when a
    # guided output was closed early to end complete within max_tokens; listed only when set.
    stop_reason: str | int | None = None

    @model_serializer(mode="wrap")
    def _drop_no_stop_reason(self, handler: Any) -> dict[str, Any]:
        return _without_none(handler(self), keys=("stop_reason",))


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    # vLLM's extra: the stop string or stop token id that ended the choice, or "budget" when a
    # guided output was closed early to end complete within max_tokens; listed only when set.
    stop_reason: str | int | None = None

    @model_serializer(mode="wrap")
    def _drop_no_stop_reason(self, handler: Any) -> dict[str, Any]:
        return _without_none(handler(self), keys=("stop_reason",))


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChunk(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sorai"
    # None (left out) for an embedding model whose files are not read yet.
    max_model_len: int | None
    # sorai's extension: how the model runs here (device, dtype, weight formats, machine).
    runtime: dict[str, str] | None = None
    # sorai's extension: False for a cached model loaded on the first request naming it.
    loaded: bool | None = None
    # A LoRA adapter's card (as vLLM's): the base model it runs on and its directory.
    parent: str | None = None
    root: str | None = None
    # sorai's extension: ["text", "image"] for a model with a vision tower (left out: text).
    input_modalities: list[str] | None = None

    @model_serializer(mode="wrap")
    def _drop_unknown_length(self, handler: Any) -> dict[str, Any]:
        keys = ("max_model_len", "runtime", "loaded", "parent", "root", "input_modalities")
        return _without_none(handler(self), keys=keys)


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Response):
    prompt: str


class Embedding(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32s


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Response):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# -- LoRA adapters at runtime (vLLM's shapes) ---------------------------------------------------


class LoadLoRAAdapterRequest(_Request):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(_Request):
    lora_name: str
    lora_path: str | None = None
