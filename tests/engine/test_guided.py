"""Guided decoding on the real default model: constrained and free requests in one batch,
closed tool arguments, output closed within its budget, the loop guard, and constraints that
fail (refused before queueing, or an error while generating, never a normal stop)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from sorai.engine import EngineConfig, LLMEngine
from sorai.engine.guided.budget import _repeats
from sorai.engine.guided.compile import choice_regex
from sorai.engine.guided.schema import close_objects
from sorai.engine.llm import LLM
from sorai.engine.params import GuidedSpec, SamplingParams
from sorai.engine.tools import ToolSetup
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


# -- closed objects ----------------------------------------------------------------------------


def test_close_objects_closes_every_object_that_declares_properties() -> None:
    leaf = {"type": "object", "properties": {"x": {"type": "integer"}}}
    schema = {
        "type": "object",
        "properties": {"a": leaf, "b": {"type": "array", "items": leaf}},
        "$defs": {"d": leaf},
        "definitions": {"e": leaf},
        "anyOf": [leaf],
        "oneOf": [leaf],
        "prefixItems": [leaf],
        "allOf": [{"properties": {"y": leaf}}],
    }
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False
    for inner in (
        closed["properties"]["a"],
        closed["properties"]["b"]["items"],
        closed["$defs"]["d"],
        closed["definitions"]["e"],
        closed["anyOf"][0],
        closed["oneOf"][0],
        closed["prefixItems"][0],
        closed["allOf"][0]["properties"]["y"],
    ):
        assert inner["additionalProperties"] is False
    # An allOf member closed on its own would forbid the other members' properties.
    assert "additionalProperties" not in closed["allOf"][0]
    assert "additionalProperties" not in leaf  # the input is left as it was
    # What a schema says stays: open objects, extra keys of a schema, property-less objects.
    assert close_objects({"properties": {}, "additionalProperties": True}) == {
        "properties": {},
        "additionalProperties": True,
    }
    extra = {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}}
    assert close_objects(extra) == extra
    assert close_objects({"type": "object"}) == {"type": "object"}
    assert close_objects({"type": "string"}) == {"type": "string"}


def test_strict_json_schema_closes_its_objects() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    for strict, closed in [(True, True), (False, False), (None, False)]:
        fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        if strict is not None:
            fmt["json_schema"]["strict"] = strict
        spec = GuidedSpec.from_request(response_format=fmt)
        assert spec is not None
        assert ("additionalProperties" in json.loads(spec.json_schema)) is closed, strict


GET_TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_forced_tool_calls_decode_under_closed_arguments() -> None:
    loose = {"type": "function", "function": {**GET_TIME["function"], "name": "loose"}}
    loose["function"]["strict"] = False
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        setup = ToolSetup.from_request([GET_TIME, loose], choice)
        schema = json.loads(setup.constraint().json_schema)
        calls = schema.get("anyOf", [schema])
        arguments = {c["properties"]["name"]["const"]: c["properties"]["arguments"] for c in calls}
        assert arguments["get_time"]["additionalProperties"] is False
        if "loose" in arguments:  # strict: false keeps the tool's schema as given
            assert "additionalProperties" not in arguments["loose"]


def test_a_forced_call_on_the_default_model_has_only_declared_arguments(llm: LLM) -> None:
    # The failure this guards: {"city":"Tokyo","type":"string","properties":{... until cut.
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(4):
        out = llm.chat(
            [{"role": "user", "content": "What time is it in Tokyo?"}],
            tools=[GET_TIME],
            tool_choice=named,
            max_tokens=32,
            temperature=1.0,
            seed=seed,
        )
        assert out.finish_reason == "tool_calls", out.text
        arguments = json.loads(out.tool_calls[0]["function"]["arguments"])
        assert set(arguments) == {"city"} and isinstance(arguments["city"], str)


# -- constraints that cannot be used, and errors while generating ----------------------------


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#"},
        {"$defs": {"x": {"$ref": "#/$defs/y"}, "y": {"$ref": "#/$defs/x"}}, "$ref": "#/$defs/x"},
        {
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/x"}},
            "required": ["a"],
            "$defs": {"x": {"$ref": "#/$defs/y"}, "y": {"$ref": "#/$defs/x"}},
        },
    ],
)
def test_a_schema_that_admits_no_output_is_refused_before_queueing(llm: LLM, schema: dict) -> None:
    # Before: compiled, then the first step failed and the answer was "" with "stop".
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=16))
    spec = GuidedSpec(json_schema=json.dumps(schema))
    with pytest.raises(SamplingError, match="cannot be used"):
        engine.check_request([1], SamplingParams(max_tokens=8, guided=spec))


def test_five_thousand_choices_compile_and_answer_one_of_them(llm: LLM) -> None:
    # Before: llguidance refused the 5,000-item row mid-generation and the matcher's error
    # ended the choice as a normal "stop", with text outside the set.
    choices = [f"item {i}" for i in range(5000)] + ['a "quoted" | choice', "日本"]
    for seed in range(2):
        out = llm.chat(
            [{"role": "user", "content": "Pick an item."}],
            guided_choice=choices,
            max_tokens=16,
            temperature=1.0,
            seed=seed,
        )
        assert out.text in choices and out.finish_reason == "stop"


def test_choice_regex_is_a_trie() -> None:
    assert choice_regex(["ab", "ac", "a"]) == "a(?:b|c)?"
    assert choice_regex(["a.", "b"]) == r"(?:a\x{2e}|b)"


def _forcing_bias(llm: LLM, text: str) -> dict[int, float]:
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, ids
    return {ids[0]: 100.0}


def test_a_matcher_error_mid_generation_ends_the_choice_as_an_error(llm: LLM) -> None:
    # A real failure, no mock: llguidance refuses an Earley row of over 2,000 items only when
    # it gets there, here after "b" (which logit_bias makes the model pick), while the shortest
    # completion ("a") lets the grammar compile.
    items = " | ".join(f'"item{i}"' for i in range(2500))
    grammar = f'start: "a" | "b" many\nmany: {items}'
    params = SamplingParams(
        max_tokens=8,
        temperature=0,
        logit_bias=_forcing_bias(llm, "b"),
        guided=GuidedSpec(grammar=grammar),
    )
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=32))
    engine.add_request("r", chat_ids(llm, "Say b."), params)
    finals = []
    while engine.has_work():
        finals += [c for out in engine.step() for c in out.choices if c.finish_reason]
    assert [c.finish_reason for c in finals] == ["error"]  # before: "stop"
    assert "during generation" in finals[0].error and "2000" in finals[0].error
    with pytest.raises(SamplingError, match="during generation"):
        llm.generate(chat_ids(llm, "Say b."), sampling=params)


# -- output that fits its budget ----------------------------------------------------------------

RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "home": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "tags", "home"],
}


SENTENCE = r"[A-Z][A-Za-z ,]+ [0-9]{2}\."
CHOICES = ["yes, a long and winding answer to the question", "ok"]


def _budget_cases() -> list:
    """(name, chat options, budgets from the shortest completion's length up, check of the
    text) for each kind of constraint."""
    return [
        pytest.param(
            "json_schema",
            {"response_format": {"type": "json_schema", "json_schema": {"schema": RECORD}}},
            (26, 30, 36, 48),
            lambda text: jsonschema.validate(json.loads(text), RECORD),
            # ~40 s; json_schema under a tight budget stays in the default tier through
            # tests/server/test_langchain.py and the budget property.
            marks=pytest.mark.slow,
        ),
        (
            "json_object",
            {"response_format": {"type": "json_object"}},
            (2, 5, 9, 16),
            lambda text: isinstance(json.loads(text), dict) or pytest.fail(text),
        ),
        pytest.param(
            "regex",
            {"guided_regex": SENTENCE},
            (6, 8, 12),
            lambda text: re.fullmatch(SENTENCE, text) or pytest.fail(text),
            marks=pytest.mark.slow,  # ~15 s; choice covers the search-based closing
        ),
        ("choice", {"guided_choice": CHOICES}, (2, 3, 4), lambda t: t in CHOICES or pytest.fail(t)),
    ]


@pytest.mark.parametrize("name,options,budgets,check", _budget_cases(), ids=lambda v: str(v)[:12])
def test_structured_output_closes_within_its_budget(
    llm: LLM, name: str, options: dict, budgets: tuple[int, ...], check
) -> None:
    messages = [{"role": "user", "content": "A person as JSON with name, age and city."}]
    closed = 0
    for max_tokens in budgets:
        for seed in range(2):
            out = llm.chat(messages, max_tokens=max_tokens, temperature=1.0, seed=seed, **options)
            assert out.finish_reason == "stop", (name, max_tokens, out.text)
            assert out.completion_tokens <= max_tokens
            check(out.text)
            closed += out.stop_reason == "budget"
    assert closed, "no answer needed closing: the budgets are too large to test anything"


def test_only_a_budget_below_the_shortest_completion_ends_with_length(llm: LLM) -> None:
    fmt = {"type": "json_schema", "json_schema": {"schema": RECORD}}
    messages = [{"role": "user", "content": "A person."}]
    out = llm.chat(messages, max_tokens=25, response_format=fmt)  # the shortest needs 26
    assert out.finish_reason == "length" and out.stop_reason is None


def test_a_looping_json_string_is_ended(llm: LLM) -> None:
    # logit_bias makes " la" the model's every choice: the string would repeat it up to
    # max_tokens; the loop guard ends it after max_string_repeats repeats.
    bias = _forcing_bias(llm, " la")
    messages = [{"role": "user", "content": "Sing."}]
    for repeats in (3, 8):
        out = llm.chat(
            messages,
            max_tokens=120,
            temperature=0,
            logit_bias=bias,
            guided_json={"type": "string"},
            max_string_repeats=repeats,
        )
        assert out.finish_reason == "stop" and out.stop_reason is None, out.text
        assert json.loads(out.text).count("la") <= repeats + 1 + 1, out.text


def test_repeats_finds_runs_of_tokens() -> None:
    assert _repeats([1, 2, 1, 2, 1, 2], 2)
    assert not _repeats([1, 2, 1, 2, 1, 3], 2)
    assert _repeats([5, 5, 5, 5], 3) and not _repeats([5, 5, 5], 3)
    with pytest.raises(SamplingError, match="max_string_repeats"):
        GuidedSpec(json_object=True, max_string_repeats=0)


def test_auto_tool_choice_holds_a_json_answer_to_the_closed_call_schemas(llm: LLM) -> None:
    setup = ToolSetup.from_request([GET_TIME], "auto")
    spec = setup.constrain(None)
    assert spec is not None and setup.constrain(GuidedSpec(regex="a")) == GuidedSpec(regex="a")
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=16))
    template = engine.guided.compile(spec)
    tokenize = engine.guided._llg_tokenizer().tokenize_str
    for text, whole in [
        ('It is noon in "Tokyo" {maybe}.', True),
        ('{"name":"get_time","arguments":{"city":"Tokyo"}}', True),
        ('{"name":"get_time","arguments":{"city":"Tokyo","zone":"JST"}}', False),
        ('{"answer": 12}', False),
    ]:
        matcher = template.deep_copy()
        ids = tokenize(text)
        assert (matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()) is whole
    # The budget keeps to calls: text cut by max_tokens ends with "length", as unguided.
    tools = [GET_TIME]
    messages = [{"role": "user", "content": "Tell me a joke."}]
    out = llm.chat(messages, tools=tools, max_tokens=6, temperature=0)
    assert out.finish_reason == "length" and out.tool_calls is None
