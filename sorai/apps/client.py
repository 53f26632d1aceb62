"""The one way apps reach a model: the OpenAI protocol, to any compatible endpoint.

`Client.connect(url, api_key, model)` talks to a remote endpoint (sorai's own server, a cloud
one, anything OpenAI-compatible). `sorai.connect()` with no URL starts sorai's server in this
process on a loopback port and connects to it, so every app runs, and is tested, the same way
against both.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import openai

from sorai.errors import SoraiError

DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
EMBED_BATCH = 256  # inputs per embeddings request (halved for endpoints that take fewer)
FATAL_STATUSES = (401, 403, 404)  # wrong key, no access, no such model
UNREACHABLE = "cannot reach"


class ClientError(SoraiError):
    """An endpoint that cannot be used: unreachable, no such model, a refused request.
    `status` is the HTTP status of a refused request (None when none came back)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def fatal(self) -> bool:
        """Every further request would fail alike: the endpoint is unreachable, refuses the
        key (401, 403) or does not serve the model (404). A batch stops on it rather than
        fail each row the same way."""
        return self.status in FATAL_STATUSES or str(self).startswith(UNREACHABLE)


def _message(error: openai.APIError) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(error)


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)


def parse_json_answer(text: str) -> Any:
    """The JSON value in a model's answer. Endpoints that enforce the schema send bare JSON;
    some that do not wrap it in a ```json fence or a sentence, so the fenced block, else the
    first complete object or array in the text, is taken. ValueError when there is none."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    fenced = _FENCE.search(text)
    if fenced:
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(fenced.group(1))
    decoder = json.JSONDecoder()
    for start, char in enumerate(text):
        if char in "{[":
            with contextlib.suppress(json.JSONDecodeError):
                return decoder.raw_decode(text, start)[0]
    raise ValueError("no JSON value in the answer")


@dataclass
class Client:
    """A chat model (and an embedding model) behind an OpenAI-compatible endpoint."""

    openai: openai.OpenAI
    model: str
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    # Called by close(): e.g. stopping the in-process server this client owns.
    on_close: Callable[[], None] | None = field(default=None, repr=False)

    @classmethod
    def connect(
        cls,
        url: str,
        api_key: str | None = None,
        model: str | None = None,
        embedding_model: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 2,
    ) -> Client:
        """Connect to `url` (the API root, e.g. http://127.0.0.1:8000/v1). model: the chat
        model to use, default the first one the endpoint lists."""
        base = url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        client = openai.OpenAI(
            base_url=base,
            # The protocol needs a key; a server without auth ignores it.
            api_key=api_key or "sk-no-key",
            timeout=timeout,
            max_retries=max_retries,
        )
        if model is None:
            model = cls._first_model(client, base)
        return cls(client, model, embedding_model or DEFAULT_EMBEDDING_MODEL)

    @staticmethod
    def _first_model(client: openai.OpenAI, base: str) -> str:
        try:
            models = [m.id for m in client.models.list()]
        except openai.APIConnectionError:
            raise ClientError(f"{UNREACHABLE} {base}: is the server running?") from None
        except openai.APIStatusError as e:
            raise ClientError(f"{base}: listing models failed: {_message(e)}") from None
        chat = [m for m in models if m != DEFAULT_EMBEDDING_MODEL]
        if not chat:
            raise ClientError(f"{base} lists no models; pass model=")
        return chat[0]

    def close(self) -> None:
        self.openai.close()
        if self.on_close is not None:
            self.on_close()
            self.on_close = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def context_length(self, model: str | None = None) -> int | None:
        """The model's context window as the endpoint reports it (`max_model_len`, as sorai
        and vLLM list it), None when it does not say."""
        wanted = model or self.model
        try:
            for card in self.openai.models.list():
                if card.id == wanted:
                    length = (card.model_extra or {}).get("max_model_len")
                    return int(length) if isinstance(length, int) else None
        except openai.APIError:
            return None
        return None

    # -- calls ------------------------------------------------------------------------------

    def chat(self, messages: Sequence[dict[str, Any]], **kwargs: Any):
        """One chat completion (the OpenAI response object); kwargs as the API takes them."""
        try:
            return self.openai.chat.completions.create(
                model=kwargs.pop("model", self.model), messages=list(messages), **kwargs
            )
        except openai.APIConnectionError as e:
            raise ClientError(f"{UNREACHABLE} {self.openai.base_url}: {e}") from None
        except openai.APIStatusError as e:
            raise ClientError(
                f"chat request refused ({e.status_code}): {_message(e)}", e.status_code
            ) from None

    def chat_json(
        self,
        messages: Sequence[dict[str, Any]],
        schema: dict[str, Any],
        name: str = "answer",
        **kwargs: Any,
    ) -> Any:
        """A chat completion decoded under a JSON schema (structured outputs), parsed."""
        response = self.chat(
            messages,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": True},
            },
            **kwargs,
        )
        text = response.choices[0].message.content or ""
        try:
            return parse_json_answer(text)
        except ValueError:
            raise ClientError(
                f"the model's answer is not the JSON asked for (finish_reason "
                f"{response.choices[0].finish_reason!r}): {text[:200]!r}"
            ) from None

    def embed(self, texts: Sequence[str], model: str | None = None) -> list[list[float]]:
        """One embedding vector per text, in order. Batches of EMBED_BATCH inputs; an endpoint
        that refuses a batch as too large (413, or a 400 for a batch of several) is sent
        halves until it takes them."""
        vectors: list[list[float]] = []
        batch = EMBED_BATCH
        start = 0
        while start < len(texts):
            inputs = list(texts[start : start + batch])
            try:
                response = self.openai.embeddings.create(
                    model=model or self.embedding_model, input=inputs
                )
            except openai.APIConnectionError as e:
                raise ClientError(f"{UNREACHABLE} {self.openai.base_url}: {e}") from None
            except openai.APIStatusError as e:
                if e.status_code in (400, 413) and len(inputs) > 1:
                    batch = len(inputs) // 2
                    continue
                raise ClientError(
                    f"embeddings request refused ({e.status_code}): {_message(e)}", e.status_code
                ) from None
            vectors += [item.embedding for item in sorted(response.data, key=lambda d: d.index)]
            start += len(inputs)
        return vectors
