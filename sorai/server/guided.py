"""Structured outputs: a request's response_format or guided_* field -> the engine's GuidedSpec.

OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema"}) and vLLM's
top-level extras (`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`) all become
one GuidedSpec; at most one of them may constrain a request. GuidedSpec.from_fields
(sorai/engine/params.py) checks their shapes, its errors naming the field; here they become 400s.
Whether llguidance can compile a schema, regex or grammar is the engine's call
(engine.check_request), whose SamplingError becomes a 400 naming the same field (checked()); a
matcher that fails while generating ends its choice with finish_reason "error", a 400 (failed()).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sorai.engine.outputs import ChoiceDelta
from sorai.engine.params import GuidedSpec
from sorai.errors import SamplingError
from sorai.server.errors import bad_request, from_sorai_error


def guided_spec(fields: Mapping[str, Any]) -> tuple[GuidedSpec | None, str | None]:
    """GuidedSpec.from_fields, with its errors as 400s naming the field at fault."""
    try:
        return GuidedSpec.from_fields(fields)
    except SamplingError as exc:
        raise from_sorai_error(exc) from None


@contextmanager
def checked(param: str | None) -> Iterator[None]:
    """Runs the engine's request checks: a constraint it cannot compile is a 400 on `param`.

    The engine says why ("the JSON schema is not valid: ..."); the API error keeps that
    message and names the field the constraint came from.
    """
    try:
        yield
    except SamplingError as exc:
        error = from_sorai_error(exc)
        if param is not None and error.param is None:
            error = bad_request(error.message, param=param)
        raise error from None


def failed(delta: ChoiceDelta) -> None:
    """Raise the API error for a choice whose guided decoding failed mid-generation
    (finish_reason "error"): a 400 the client sees, whole or streamed, never a normal stop."""
    if delta.finish_reason == "error":
        raise bad_request(delta.error or "guided decoding failed", code="guided_decoding_failed")
