"""Structured outputs: a request's response_format or guided_* field -> the engine's GuidedSpec.

OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema"}) and vLLM's
top-level extras (`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`) all become
one GuidedSpec; at most one of them may constrain a request. Shapes are checked here, with
messages naming the field; whether llguidance can compile a schema, regex or grammar is the
engine's call (engine.check_request), whose SamplingError becomes a 400 naming the same field
(see checked()).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sorai.errors import SamplingError
from sorai.sampling import GuidedSpec
from sorai.server.errors import bad_request, from_sorai_error

GUIDED_FIELDS = (
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)


def schema_text(schema: Any, param: str) -> str:
    """A JSON schema given as an object or as JSON text -> JSON text (400 if it is neither)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise bad_request(f"{param} is not valid JSON: {exc.msg}", param=param) from None
    if isinstance(schema, bool):
        # JSON Schema's `true` allows anything, `false` nothing.
        if not schema:
            raise bad_request(f"{param} is the schema false, which nothing matches", param=param)
        schema = {}
    if not isinstance(schema, dict):
        raise bad_request(
            f"{param} must be a JSON schema (an object), got {type(schema).__name__}", param=param
        )
    return json.dumps(schema, ensure_ascii=False)


def _response_format(value: Any) -> GuidedSpec | None:
    param = "response_format"
    if not isinstance(value, dict):
        raise bad_request(
            'response_format must be an object such as {"type": "json_object"}', param=param
        )
    kind = value.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedSpec(json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request(
                'response_format of type json_schema needs "json_schema": '
                '{"name": ..., "schema": {...}}',
                param="response_format.json_schema",
            )
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise bad_request(
                "response_format.json_schema.name must be a string",
                param="response_format.json_schema.name",
            )
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad_request(
                "response_format.json_schema.strict must be true or false",
                param="response_format.json_schema.strict",
            )
        if spec.get("schema") is None:
            # OpenAI makes the schema optional: without one, any JSON object.
            return GuidedSpec(json_object=True)
        # Always enforced, strict or not: the output matches the schema.
        return GuidedSpec(
            json_schema=schema_text(spec["schema"], "response_format.json_schema.schema")
        )
    raise bad_request(
        f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r:.60}",
        param="response_format.type",
    )


def _one(field: str, value: Any) -> GuidedSpec | None:
    if field == "response_format":
        return _response_format(value)
    if field == "guided_json":
        return GuidedSpec(json_schema=schema_text(value, field))
    if field == "guided_choice":
        if not isinstance(value, list) or not value:
            raise bad_request("guided_choice must be a non-empty list of strings", param=field)
        for i, choice in enumerate(value):
            if not isinstance(choice, str) or not choice:
                raise bad_request(
                    f"guided_choice must hold non-empty strings, got {choice!r:.60}",
                    param=f"{field}.{i}",
                )
        return GuidedSpec(choice=tuple(value))
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{field} must be a non-empty string", param=field)
    if field == "guided_regex":
        return GuidedSpec(regex=value)
    return GuidedSpec(grammar=value)


def guided_spec(fields: Mapping[str, Any]) -> tuple[GuidedSpec | None, str | None]:
    """The constraint the request asks for and the field that asked (None, None without one).

    `fields` maps GUIDED_FIELDS to their values (None: absent). A response_format of type
    "text" is no constraint; two constraints are a 400.
    """
    found: list[tuple[str, GuidedSpec]] = []
    for field in GUIDED_FIELDS:
        value = fields.get(field)
        if value is None:
            continue
        try:
            spec = _one(field, value)
        except SamplingError as exc:
            raise bad_request(str(exc), param=field) from None
        if spec is not None:
            found.append((field, spec))
    if len(found) > 1:
        names = " and ".join(field for field, _ in found)
        raise bad_request(
            f"give at most one output constraint (response_format or one guided_* field); "
            f"got {names}",
            param=found[1][0],
        )
    if not found:
        return None, None
    field, spec = found[0]
    return spec, field


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
