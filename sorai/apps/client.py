"""The one way apps reach a model: the OpenAI protocol, to any compatible endpoint.

`Client.connect(url, api_key, model)` talks to a given endpoint (sorai's own server, a cloud
one, anything OpenAI-compatible); `Client.local(model)` starts sorai's server in this process on
a loopback port; `Client.find()` picks one the way every app verb and `sorai.connect()` do:
--url, else $SORAI_URL or $OPENAI_BASE_URL, else a `sorai serve` answering on the default port,
else the server in this process. Apps run, and are tested, the same way against all of them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import openai

from sorai import hub
from sorai.errors import SoraiError

if TYPE_CHECKING:
    from openai.types import CompletionUsage

    from sorai.engine.params import SamplingParams

DEFAULT_EMBEDDING_MODEL = hub.DEFAULT_EMBEDDING_MODEL
EMBED_BATCH = 256  # inputs per embeddings request (halved for endpoints that take fewer)
FATAL_STATUSES = (401, 403, 404)  # wrong key, no access, no such model
UNREACHABLE = "cannot reach"

# Where `sorai serve` listens when not told otherwise. $SORAI_DEFAULT_URL moves the probe, or
# turns it off with "none" (the tests do, so that a developer's own server stays out of them).
DEFAULT_URL = "http://127.0.0.1:8000/v1"
DEFAULT_URL_VAR = "SORAI_DEFAULT_URL"
PROBE_TIMEOUT = 2.0  # seconds; a server on this machine lists its models in milliseconds
SORAI_OWNER = "sorai"  # the `owned_by` of the model cards sorai's server lists
# Environment variables naming an endpoint, in the order tried, each with its keys in order.
URL_VARS = (
    ("SORAI_URL", ("SORAI_API_KEY", "OPENAI_API_KEY")),
    ("OPENAI_BASE_URL", ("OPENAI_API_KEY", "SORAI_API_KEY")),
)
# What listens on the default port is only probed with sorai's key, never with OpenAI's.
DEFAULT_URL_KEYS = ("SORAI_API_KEY",)
ANY_KEY = ("SORAI_API_KEY", "OPENAI_API_KEY")  # for a URL given outright


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


def api_root(url: str) -> str:
    """http://host:port, http://host:port/ or http://host:port/v1 -> http://host:port/v1."""
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def first_chat_model(models: Sequence[str], where: str) -> str:
    """The first of an endpoint's models that is not the embedding model."""
    chat = [m for m in models if m != DEFAULT_EMBEDDING_MODEL]
    if not chat:
        raise ClientError(f"{where} lists no models; pass model=")
    return chat[0]


# SamplingParams fields the OpenAI API names itself; the rest go in the body as vLLM's extras.
_OPENAI_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)
_EXTRA_FIELDS = ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos")


def request_options(params: SamplingParams) -> dict[str, Any]:
    """A `sorai.SamplingParams` as the keyword arguments of a completions request: OpenAI's
    own fields when set, sorai's (and vLLM's) extras in the body when not at their default."""
    defaults = type(params)()
    options: dict[str, Any] = {
        name: getattr(params, name) for name in _OPENAI_FIELDS if getattr(params, name) is not None
    }
    if params.stop:
        options["stop"] = list(params.stop)
    extra = {
        name: getattr(params, name)
        for name in _EXTRA_FIELDS
        if getattr(params, name) != getattr(defaults, name)
    }
    if extra:
        options["extra_body"] = extra
    return options


@contextlib.contextmanager
def _refusals(what: str, where: str) -> Iterator[None]:
    """openai's errors as ClientErrors; `what` names the request, `where` the endpoint."""
    try:
        yield
    except openai.APIConnectionError as e:
        raise ClientError(f"{UNREACHABLE} {where}: {e}") from None
    except openai.APIStatusError as e:
        raise ClientError(
            f"{what} request refused ({e.status_code}): {_message(e)}", e.status_code
        ) from None
    except openai.APIError as e:  # an error event in the middle of a stream
        raise ClientError(f"{what} request failed: {_message(e)}") from None


def _list_models(client: openai.OpenAI) -> list[str]:
    base = str(client.base_url).rstrip("/")
    try:
        return [m.id for m in client.models.list()]
    except openai.APIConnectionError:
        raise ClientError(f"{UNREACHABLE} {base}: is the server running?") from None
    except openai.APIStatusError as e:
        if e.status_code in (401, 403):
            raise ClientError(
                f"{base} refused the API key ({e.status_code}): {_message(e)}", e.status_code
            ) from None
        raise ClientError(f"{base}: listing models failed: {_message(e)}", e.status_code) from None


class TextStream:
    """A completion streamed as text: iterating it yields the deltas as they come, after which
    `finish_reason` and `usage` (None when the endpoint sends none) are set. Closing it (its
    `with` block, or a loop left early) drops the connection, which aborts the request."""

    def __init__(
        self, stream: openai.Stream[Any], text: Callable[[Any], str | None], what: str, where: str
    ) -> None:
        self._stream = stream
        self._text = text
        self._what, self._where = what, where
        self.finish_reason: str | None = None
        self.usage: CompletionUsage | None = None

    def __iter__(self) -> Iterator[str]:
        with _refusals(self._what, self._where), self._stream:
            for chunk in self._stream:
                self.usage = chunk.usage or self.usage
                for choice in chunk.choices:
                    self.finish_reason = choice.finish_reason or self.finish_reason
                    text = self._text(choice)
                    if text:
                        yield text

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- which endpoint -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where `Client.find` connects: `url` (the API root), None for sorai's server in this
    process; `status`, the line an app prints first, says which and why."""

    url: str | None
    api_key: str | None
    status: str


def _env(*names: str) -> str | None:
    """The first of the environment variables `names` that is set and not blank."""
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _probe(root: str, key: str | None) -> tuple[int | None, Any]:
    """GET `root`/models: (HTTP status, JSON body or None), or (None, None) when nothing
    answers within PROBE_TIMEOUT."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(f"{root}/models", headers=headers)
    # No proxy: the default port is this machine's, whatever $HTTP_PROXY says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=PROBE_TIMEOUT) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, None
    # OSError: refused, reset, timed out; HTTPException: not HTTP; ValueError: not a URL.
    except (OSError, http.client.HTTPException, ValueError):
        return None, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def _sorai_models(body: Any) -> list[str] | None:
    """The model ids in a /v1/models answer from sorai's server, None for anyone else's."""
    cards = body.get("data") if isinstance(body, dict) else None
    if not isinstance(cards, list) or not all(isinstance(c, dict) for c in cards):
        return None
    if not any(card.get("owned_by") == SORAI_OWNER for card in cards):
        return None
    return [str(card.get("id")) for card in cards]


def find_endpoint(
    url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    embedding_model: str | None = None,
) -> Endpoint:
    """Which endpoint `Client.find` uses, first that applies: `url`; $SORAI_URL, else
    $OPENAI_BASE_URL; a `sorai serve` answering on the default port (DEFAULT_URL, or
    $SORAI_DEFAULT_URL; "none" skips it) that serves `model` and `embedding_model` (those
    named); else sorai's server in this process. The key: `api_key`, else the environment's
    ($SORAI_API_KEY, else $OPENAI_API_KEY; $OPENAI_API_KEY first for $OPENAI_BASE_URL; only
    $SORAI_API_KEY for the default port). A server on the default port that asks for a key
    it is not given, or refuses it, is a ClientError rather than passed over in silence."""
    if url:
        root = api_root(url)
        return Endpoint(root, api_key or _env(*ANY_KEY), f"using {root} (--url)")
    for variable, keys in URL_VARS:
        value = _env(variable)
        if value:
            root = api_root(value)
            return Endpoint(root, api_key or _env(*keys), f"using {root} (${variable})")

    def in_process(reason: str) -> Endpoint:
        return Endpoint(
            None,
            None,
            f"starting sorai's server in this process with {model or hub.DEFAULT_MODEL} "
            f"({reason}; --url uses a running endpoint)",
        )

    default = _env(DEFAULT_URL_VAR) or DEFAULT_URL
    if default.lower() == "none":
        return in_process(f"${DEFAULT_URL_VAR} is none")
    root = api_root(default)
    key = api_key or _env(*DEFAULT_URL_KEYS)
    status, body = _probe(root, key)
    if status is None:
        return in_process(f"no sorai serve answers at {root}")
    if status in (401, 403):
        asked = "refused the API key given" if key else "asks for an API key"
        raise ClientError(
            f"the server on the default port, {root}, {asked} ({status}): pass sorai serve's "
            "key (api_key=, --api-key or $SORAI_API_KEY), or another endpoint (--url), or set "
            f"{DEFAULT_URL_VAR}=none to start sorai's server in this process",
            status,
        )
    served = _sorai_models(body) if status == 200 else None
    if served is None:
        return in_process(f"{root} answers, but not as sorai serve")
    missing = [name for name in (model, embedding_model) if name and name not in served]
    if missing:
        return in_process(f"sorai serve at {root} does not serve {', '.join(missing)}")
    return Endpoint(root, key, f"using sorai serve at {root} (found on the default port)")


@dataclass
class Client:
    """A chat model (and an embedding model) behind an OpenAI-compatible endpoint."""

    openai: openai.OpenAI
    model: str
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    # Called by close(): e.g. stopping the in-process server this client owns.
    on_close: Callable[[], None] | None = field(default=None, repr=False)
    # Talking to sorai's server in this process (Client.local), on a new port each time.
    in_process: bool = False

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
        client = openai.OpenAI(
            base_url=api_root(url),
            # The protocol needs a key; a server without auth ignores it.
            api_key=api_key or "sk-no-key",
            timeout=timeout,
            max_retries=max_retries,
        )
        if model is None:
            model = first_chat_model(_list_models(client), api_root(url))
        return cls(client, model, embedding_model or DEFAULT_EMBEDDING_MODEL)

    @classmethod
    def local(
        cls, model: str | os.PathLike[str] | None = None, embedding_model: str | None = None
    ) -> Client:
        """sorai's own server, started in this process on a loopback port, serving `model`
        (default: the embedded default model) and `embedding_model` (default all-minilm-l6-v2,
        loaded on its first request); `close()` stops it."""
        # Imported here, and nowhere else in the apps: the server stack, and a model load.
        from sorai.server.local import LocalServer

        server = LocalServer(
            model or hub.DEFAULT_MODEL, embedding_model=embedding_model or DEFAULT_EMBEDDING_MODEL
        )
        client = cls.connect(server.url, server.api_key, server.model, embedding_model)
        client.on_close = server.close
        client.in_process = True
        return client

    @classmethod
    def find(
        cls,
        url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        embedding_model: str | None = None,
        *,
        chat: bool = True,
        report: Callable[[str], None] | None = None,
        timeout: float = 600.0,
        max_retries: int = 2,
    ) -> Client:
        """The endpoint `find_endpoint` picks: `url`; else $SORAI_URL or $OPENAI_BASE_URL;
        else a `sorai serve` answering on http://127.0.0.1:8000/v1; else sorai's server
        started in this process (`Client.local`). `report` is given the line saying which and
        why before any (slow) start. chat=False: only embeddings will be asked for, so no chat
        model is looked up (nor `model` required of the endpoint)."""
        endpoint = find_endpoint(url, api_key, model if chat else None, embedding_model)
        if report is not None:
            report(endpoint.status)
        if endpoint.url is None:
            return cls.local(model if chat else None, embedding_model)
        if not chat:
            model = embedding_model or DEFAULT_EMBEDDING_MODEL  # spares listing the models
        return cls.connect(
            endpoint.url, endpoint.api_key, model, embedding_model, timeout, max_retries
        )

    @property
    def where(self) -> str:
        """The endpoint's API root, e.g. http://127.0.0.1:8000/v1."""
        return str(self.openai.base_url).rstrip("/")

    def models(self) -> list[str]:
        """The ids of the models the endpoint lists."""
        return _list_models(self.openai)

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
        with _refusals("chat", self.where):
            return self.openai.chat.completions.create(
                model=kwargs.pop("model", self.model), messages=list(messages), **kwargs
            )

    def stream_chat(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> TextStream:
        """A chat completion streamed: its text deltas as they come (see TextStream)."""
        with _refusals("chat", self.where):
            stream = self.openai.chat.completions.create(
                model=kwargs.pop("model", self.model),
                messages=list(messages),
                stream=True,
                stream_options={"include_usage": True},
                **kwargs,
            )
        return TextStream(stream, lambda choice: choice.delta.content, "chat", self.where)

    def stream_completion(self, prompt: str, **kwargs: Any) -> TextStream:
        """A (text) completion of `prompt` streamed: its deltas as they come (TextStream)."""
        with _refusals("completion", self.where):
            stream = self.openai.completions.create(
                model=kwargs.pop("model", self.model),
                prompt=prompt,
                stream=True,
                stream_options={"include_usage": True},
                **kwargs,
            )
        return TextStream(stream, lambda choice: choice.text, "completion", self.where)

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

    def choice_probabilities(
        self, messages: Sequence[dict[str, Any]], choices: Sequence[str], **kwargs: Any
    ) -> dict[str, float]:
        """The probability of each choice as the model's next answer, read from the first
        token's top logprobs (one token generated): a token counts for a choice when it is,
        case and spaces aside, a prefix of it ("Yes", " yes" for "yes"). Normalized over the
        choices; uniform when the model puts none of them among its top tokens."""
        response = self.chat(
            messages, max_tokens=1, temperature=0, logprobs=True, top_logprobs=20, **kwargs
        )
        logprobs = response.choices[0].logprobs
        first = logprobs.content[0].top_logprobs if logprobs and logprobs.content else []
        mass = dict.fromkeys(choices, 0.0)
        for entry in first:
            token = entry.token.strip().lower()
            for choice in choices:
                if token and choice.lower().startswith(token):
                    mass[choice] += math.exp(entry.logprob)
                    break  # a token shared by two choices' starts counts once, for the first
        total = sum(mass.values())
        if total <= 0.0:
            return {choice: 1.0 / len(choices) for choice in choices}
        return {choice: value / total for choice, value in mass.items()}

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
