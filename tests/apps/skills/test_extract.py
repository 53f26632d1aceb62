"""extract on the seed's flight requests with the embedded default model: all six fields, valid
against the schema (the values are the small model's; the structure is guaranteed)."""

from __future__ import annotations

import jsonschema
import pytest

from sorai.apps.client import Client
from sorai.apps.skills.base import SkillError
from sorai.apps.skills.extract import extract, fields_schema

# The seed: date/time, departure, arrival, airline, class, tickets.
FIELDS = {
    "日時": "出発の日付と時刻",
    "出発": "出発地の空港",
    "到着": "到着地",
    "航空会社": "航空会社",
    "クラス": "座席のクラス",
    "枚数": "航空券の枚数",
}
FIRST = (
    "2月10日 19:20 成田発、シアトル行きなのユナイテッド航空 616 便をエコノミークラスで6枚ください。"
)
FIRST_RECORD = {
    "日時": "02/10 19:20",
    "出発": "成田",
    "到着": "シアトル",
    "航空会社": "ユナイテッド航空",
    "クラス": "エコノミー",
    "枚数": "6",
}
SECOND = "全日空の羽田発、ロサンゼルス行きで、10月20日午後3:00出発をエコノミークラスで1枚ください。"


def test_seed_flight_request_gives_all_six_fields(client: Client) -> None:
    record = extract(client, SECOND, FIELDS, examples=[(FIRST, FIRST_RECORD)])
    assert set(record) == set(FIELDS)
    jsonschema.validate(record, fields_schema(FIELDS))
    assert all(isinstance(value, str) for value in record.values())


def test_a_json_schema_with_types(client: Client) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "guests": {"type": "integer", "minimum": 1}},
    }
    record = extract(client, "A table for 4 in Kyoto, please.", schema)
    jsonschema.validate(record, fields_schema(schema))
    assert isinstance(record["guests"], int)


def test_bad_fields() -> None:
    with pytest.raises(SkillError, match="at least one field"):
        fields_schema({})
    with pytest.raises(SkillError, match="not a valid JSON schema"):
        fields_schema({"type": "object", "properties": {"x": {"type": "nonsense"}}})
    with pytest.raises(SkillError, match="does not fit the fields"):
        extract(None, "x", {"a": "b"}, examples=[("x", {"zzz": "1"})])  # type: ignore[arg-type]


def test_nested_objects_are_closed_and_required_as_strict_endpoints_demand() -> None:
    """OpenAI-style strict structured outputs refuse a schema whose nested objects allow other
    properties or leave some out of `required`; what the user set is kept."""
    schema = fields_schema(
        {
            "type": "object",
            "properties": {
                "flight": {
                    "type": "object",
                    "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
                },
                "passengers": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "class": {"enum": ["economy", "business"]},
                        },
                        "required": ["name"],
                    },
                },
            },
        }
    )
    flight = schema["properties"]["flight"]
    passenger = schema["properties"]["passengers"]["items"]
    assert (schema["required"], flight["required"]) == (["flight", "passengers"], ["from", "to"])
    assert schema["additionalProperties"] is flight["additionalProperties"] is False
    assert passenger["additionalProperties"] is False and passenger["required"] == ["name"]
    record = {"flight": {"from": "NRT", "to": "SEA", "gate": 3}, "passengers": []}
    assert not jsonschema.Draft202012Validator(schema).is_valid(record)
