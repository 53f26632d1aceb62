"""`sorai chat --url`: answer through a running sorai (or any OpenAI-compatible) server.

Uses the official openai client, so what works here works for any client of the server.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from sorai.engine.params import SamplingParams
from sorai.errors import SoraiError

# SamplingParams fields OpenAI's API names itself; the rest go in the body as vLLM extras.
_OPENAI_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)
_EXTRA_FIELDS = ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos")

Responder = Callable[[list[dict[str, str]]], str]


def api_base(url: str) -> str:
    """http://host:port, http://host:port/ or http://host:port/v1 -> http://host:port/v1."""
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def _request_options(params: SamplingParams) -> dict[str, Any]:
    defaults = SamplingParams()
    options: dict[str, Any] = {name: getattr(params, name) for name in _OPENAI_FIELDS}
    options = {k: v for k, v in options.items() if v is not None}
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


def remote_responder(
    url: str,
    api_key: str | None,
    model: str,
    params: SamplingParams,
    verbose: bool,
    say: Callable[[str], None],
) -> tuple[Responder, str]:
    """A function that streams one answer to stdout and returns it, and the model it talks to."""
    try:
        import openai
    except ImportError:
        raise SoraiError("sorai chat --url needs the openai package (pip install openai)") from None
    key = api_key or os.environ.get("SORAI_API_KEY") or "no-key"
    client = openai.OpenAI(base_url=api_base(url), api_key=key, max_retries=0)
    try:
        served = [m.id for m in client.models.list().data]
    except openai.AuthenticationError:
        raise SoraiError(f"{url} refused the API key (give one with --api-key)") from None
    except openai.APIConnectionError:
        raise SoraiError(f"cannot reach a server at {url}") from None
    except openai.APIError as exc:
        raise SoraiError(f"{url}: {exc}") from None
    if not served:
        raise SoraiError(f"{url} serves no models")
    name = model if model in served else served[0]
    options = _request_options(params)

    def respond(messages: list[dict[str, str]]) -> str:
        pieces: list[str] = []
        usage = None
        started = time.perf_counter()
        try:
            stream = client.chat.completions.create(
                model=name,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                **options,
            )
            # `with`: leaving early (Ctrl-C) closes the connection, which aborts the request.
            with stream:
                for chunk in stream:
                    usage = chunk.usage or usage
                    for choice in chunk.choices:
                        if choice.delta.content:
                            pieces.append(choice.delta.content)
                            print(choice.delta.content, end="", flush=True)
        except openai.APIStatusError as exc:
            message = exc.body.get("message") if isinstance(exc.body, dict) else None
            raise SoraiError(message or str(exc)) from None
        except openai.APIError as exc:
            raise SoraiError(str(exc)) from None
        print(flush=True)
        if verbose and usage is not None:
            seconds = time.perf_counter() - started
            rate = usage.completion_tokens / seconds if seconds > 0 else 0.0
            say(
                f"[{usage.prompt_tokens} prompt tokens, {usage.completion_tokens} generated in "
                f"{seconds:.2f}s, {rate:.1f} tokens/s]"
            )
        return "".join(pieces)

    return respond, name
