"""extract: fields out of a text, as a JSON object that validates against a schema.

Fields are a JSON schema (an object schema) or a simple mapping `name: description` (each a
string, all required). The answer is decoded under the schema (structured outputs), so on
sorai's server it always validates; it is validated again here, so an endpoint that does not
enforce schemas gives a clear error rather than a wrong record.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import jsonschema

from sorai.apps.client import Client
from sorai.apps.skills.base import SkillError, checked

INSTRUCTION = (
    "Extract the fields from the text. Copy values as they are written in the text; when a "
    "value is not in the text, give an empty string."
)


_SUBSCHEMAS = ("items", "additionalItems", "contains", "not", "if", "then", "else")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def _closed(schema: Any) -> Any:
    """A copy of `schema` whose objects, at every depth, default to no other properties and
    every property required: what strict structured outputs (OpenAI's among them) demand of
    nested objects as of the top one, and what the record is validated against."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMAS:
        if key in out:
            out[key] = _closed(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(item) for item in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {name: _closed(item) for name, item in out[key].items()}
    if isinstance(out.get("properties"), Mapping):
        out.setdefault("additionalProperties", False)
        out.setdefault("required", list(out["properties"]))
    return out


MAX_FIELD = 200  # characters of a `name: description` field's value


def fields_schema(fields: Mapping[str, Any]) -> dict[str, Any]:
    """An object schema from `fields`: a JSON schema as is, or `name: description` pairs."""
    if fields.get("type") == "object" and isinstance(fields.get("properties"), Mapping):
        schema = _closed(fields)
    else:
        if not fields:
            raise SkillError("extract needs at least one field")
        for name, description in fields.items():
            if not isinstance(name, str) or not name.strip() or not isinstance(description, str):
                raise SkillError(f"fields map names to descriptions, got {name!r}: {description!r}")
        schema = {
            "type": "object",
            "properties": {
                # Bounded, so that a model that loops on one field still closes the record.
                name: {"type": "string", "description": description, "maxLength": MAX_FIELD}
                for name, description in fields.items()
            },
            "required": list(fields),
            "additionalProperties": False,
        }
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise SkillError(f"the fields' schema is not a valid JSON schema: {e.message}") from None
    return schema


def messages(
    text: str,
    schema: dict[str, Any],
    examples: Sequence[tuple[str, dict[str, Any]]] = (),
    instruction: str = INSTRUCTION,
) -> list[dict[str, str]]:
    lines = [instruction, "", "Fields:"]
    for name, spec in schema["properties"].items():
        description = spec.get("description", "") if isinstance(spec, Mapping) else ""
        lines.append(f"- {name}" + (f": {description}" if description else ""))
    lines += ["", "Answer with one JSON object holding exactly these fields."]
    chat = [{"role": "system", "content": "\n".join(lines)}]
    for example, record in examples:
        chat.append({"role": "user", "content": example})
        chat.append({"role": "assistant", "content": json.dumps(record, ensure_ascii=False)})
    chat.append({"role": "user", "content": text})
    return chat


def extract(
    client: Client,
    text: str,
    fields: Mapping[str, Any],
    examples: Sequence[tuple[str, dict[str, Any]]] = (),
    instruction: str = INSTRUCTION,
    max_tokens: int = 512,
) -> dict[str, Any]:
    """The record of `fields` found in `text`; few-shot `examples` are (text, record) pairs."""
    schema = fields_schema(fields)
    if not text.strip():
        raise SkillError("nothing to extract from: the text is empty")
    validator = jsonschema.Draft202012Validator(schema)
    for _, record in examples:
        error = next(iter(validator.iter_errors(record)), None)
        if error is not None:
            raise SkillError(f"example record {record!r} does not fit the fields: {error.message}")
    record = client.chat_json(
        messages(text, schema, examples, instruction),
        schema,
        name="extraction",
        temperature=0,
        max_tokens=max_tokens,
    )
    return checked(record, schema, "record")


def extract_many(
    client: Client,
    texts: Sequence[str],
    fields: Mapping[str, Any],
    examples: Sequence[tuple[str, dict[str, Any]]] = (),
    instruction: str = INSTRUCTION,
) -> list[dict[str, Any]]:
    return [extract(client, text, fields, examples, instruction) for text in texts]
