"""JSON-schema transforms for guided decoding: close the objects a schema leaves open.

OpenAI's strict mode allows only an object's declared properties; JSON Schema's default
(`additionalProperties` absent) allows any other key too, and a small model under such a schema
invents keys until max_tokens. `close_objects` writes `additionalProperties: false` into every
object that declares properties and says nothing about others.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Keywords whose value is one subschema, or a list of them, or a map of name -> subschema.
_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames")
_LISTS = ("prefixItems", "anyOf", "oneOf", "items")
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# Keywords that already say what an object's other keys may be.
_OPEN_KEYWORDS = ("additionalProperties", "unevaluatedProperties", "patternProperties")


def close_objects(schema: Any) -> Any:
    """A copy of `schema` where every object schema that declares `properties` and has no
    `additionalProperties` (nor patternProperties / unevaluatedProperties) gets
    `additionalProperties: false`, recursively (properties, items, prefixItems, anyOf, oneOf,
    allOf, $defs, definitions, ...). Object schemas that declare no properties stay open: closing
    one would allow only `{}`. Members of an allOf are not closed themselves (each would forbid
    the others' properties), only what they contain."""
    return _close(schema, close_self=True)


def _close(schema: Any, close_self: bool) -> Any:
    if not isinstance(schema, Mapping):
        return schema
    out: dict[str, Any] = dict(schema)
    for key in _ONE:
        if isinstance(out.get(key), Mapping):
            out[key] = _close(out[key], True)
    for key in _LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_close(s, True) for s in out[key]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [_close(s, False) for s in out["allOf"]]
    for key in _MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {name: _close(s, True) for name, s in out[key].items()}
    if isinstance(out.get("additionalProperties"), Mapping):
        out["additionalProperties"] = _close(out["additionalProperties"], True)
    if close_self and _is_object(out) and not any(k in out for k in _OPEN_KEYWORDS):
        out["additionalProperties"] = False
    return out


def _is_object(schema: Mapping[str, Any]) -> bool:
    if not isinstance(schema.get("properties"), Mapping):
        return False
    kind = schema.get("type", "object")
    return kind == "object" or (isinstance(kind, list) and "object" in kind)
