"""Guided decoding on the real default model: constrained and free requests in one batch."""

from __future__ import annotations

import json
import re

import pytest

from sorai.engine import EngineConfig, LLMEngine
from sorai.engine.llm import LLM
from sorai.engine.params import GuidedSpec, SamplingParams
from sorai.errors import SamplingError
from tests.engine.test_engine import chat_ids, run

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(default_llm: LLM) -> LLM:
    """The session's default model (tests/conftest.py): nothing here changes its weights."""
    return default_llm


def test_constrained_and_free_requests_share_a_batch(llm: LLM) -> None:
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=128))
    ask = chat_ids(llm, "Describe a person.")
    requests = {
        "schema": GuidedSpec(json_schema=json.dumps(PERSON)),
        "choice": GuidedSpec(choice=("yes", "no", "maybe so")),
        "regex": GuidedSpec(regex=r"[A-Z][a-z]{2,8} [0-9]{2}"),
        "object": GuidedSpec(json_object=True),
    }
    batch = {
        name: (ask, SamplingParams(max_tokens=80, temperature=1.0, seed=3, guided=spec))
        for name, spec in requests.items()
    }
    # "Any object" at temperature 1 may ramble past any budget; a greedy answer to a question
    # that has one ends.
    capital = chat_ids(llm, "Reply in JSON: what is the capital of France?")
    batch["object"] = (
        capital,
        SamplingParams(max_tokens=40, temperature=0, guided=requests["object"]),
    )
    batch["free"] = (ask, SamplingParams(max_tokens=8, temperature=0))
    results = run(engine, batch)
    person = json.loads(results["schema"][0][0])
    assert set(person) == {"name", "age", "pet"}
    assert isinstance(person["age"], int) and 0 <= person["age"] <= 120
    assert person["pet"] in ("cat", "dog", "none") and len(person["name"]) <= 16
    assert results["choice"][0][0] in ("yes", "no", "maybe so")
    assert re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{2}", results["regex"][0][0])
    assert isinstance(json.loads(results["object"][0][0]), dict)
    for name in requests:
        assert results[name][0][2] == "stop", name  # the grammar completed
    free = llm.generate(ask, max_tokens=8, temperature=0)
    assert results["free"][0][1] == free.token_ids  # a neighbour's mask leaks nowhere
    assert engine.pool.num_used == 0


def test_a_constraint_that_does_not_compile_is_refused_with_the_reason(llm: LLM) -> None:
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=16))
    with pytest.raises(SamplingError, match="cannot be used"):
        engine.check_request([1], SamplingParams(max_tokens=4, guided=GuidedSpec(regex="a(b")))
    with pytest.raises(SamplingError, match="cannot be used"):
        engine.check_request(
            [1], SamplingParams(max_tokens=4, guided=GuidedSpec(grammar="start: undefined_rule"))
        )


def test_the_python_api_takes_response_format_and_guided_extras(llm: LLM) -> None:
    messages = [{"role": "user", "content": "Is the sky blue?"}]
    out = llm.chat(messages, max_tokens=10, guided_choice=["yes", "no"])
    assert out.text in ("yes", "no") and out.finish_reason == "stop"
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    person = json.loads(llm.chat(messages, max_tokens=80, response_format=fmt).text)
    assert set(person) == {"name", "age", "pet"}


def test_guided_spec_from_request_shapes() -> None:
    assert GuidedSpec.from_request(response_format={"type": "text"}) is None
    assert GuidedSpec.from_request(response_format={"type": "json_object"}).json_object
    spec = GuidedSpec.from_request(guided_json='{"type": "integer"}')
    assert spec is not None and json.loads(spec.json_schema) == {"type": "integer"}
    with pytest.raises(SamplingError, match="at most one"):
        GuidedSpec.from_request(guided_regex="a", guided_choice=["a"])
    with pytest.raises(SamplingError, match="not valid JSON"):
        GuidedSpec.from_request(guided_json="{nope")
    with pytest.raises(SamplingError, match="type must be"):
        GuidedSpec.from_request(response_format={"type": "yaml"})
    with pytest.raises(SamplingError, match="non-empty list"):
        GuidedSpec(choice=())


def test_from_request_keeps_the_schemas_property_order() -> None:
    schema = {"type": "object", "properties": {"zeta": {}, "alpha": {}}}
    spec = GuidedSpec.from_request(guided_json=schema)
    assert spec is not None and list(json.loads(spec.json_schema)["properties"]) == [
        "zeta",
        "alpha",
    ]


def test_from_fields_names_the_field_at_fault() -> None:
    spec, field = GuidedSpec.from_fields({"guided_regex": "a+", "response_format": None})
    assert (spec, field) == (GuidedSpec(regex="a+"), "guided_regex")
    # OpenAI makes json_schema's schema optional: any JSON object.
    fmt = {"type": "json_schema", "json_schema": {"name": "x"}}
    assert GuidedSpec.from_request(response_format=fmt) == GuidedSpec(json_object=True)
    for fields, param in [
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"guided_json": False}, "guided_json"),
        ({"guided_choice": ["a", 1]}, "guided_choice.1"),
        ({"guided_regex": "a", "guided_grammar": "start: 'a'"}, "guided_grammar"),
    ]:
        with pytest.raises(SamplingError) as info:
            GuidedSpec.from_fields(fields)
        assert info.value.param == param, fields
