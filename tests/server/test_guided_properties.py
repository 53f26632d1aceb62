"""Property tests of guided decoding through the server and the real default model.

Hypothesis draws a constraint (a JSON schema, a list of choices, a regex) and a seed; every
output of the model at temperature 1 must satisfy it: parse and validate with jsonschema
(formats checked too), be one of the choices, fullmatch with Python's re. Constraints are
bounded (maxLength, maxItems, bounded quantifiers) so that outputs end well inside max_tokens,
and example counts are small: each example is a few seconds of generation on a 2-core CPU.

Slow tier (`make test-all`): half a minute of generation; the default tier checks the same
constraints through the server on the real model in test_structured_live.py (json_schema, choice,
regex) and tests/engine/test_guided.py, and runs a few examples of the budget property below:
unbounded schemas (strings and integers without bounds, patterns, enums, nested objects and
arrays, any required set) under a random max_tokens in 8..200 always give an answer that parses
and validates, unless max_tokens is below the schema's shortest completion ("length").
"""

from __future__ import annotations

import datetime
import json
import re
import string

import jsonschema
import pytest
from hypothesis import Phase, given, note, settings
from hypothesis import strategies as st

from tests.server.conftest import Served

SETTINGS = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure here is not a fluke
    # No shrinking: each try is seconds of generation; the failing example is printed as is.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
SEEDS = st.integers(min_value=0, max_value=2**31)
FORMAT_CHECKER = jsonschema.FormatChecker()


@FORMAT_CHECKER.checks("date", raises=ValueError)
def _full_date(value: object) -> bool:
    """RFC 3339's full-date as llguidance checks it: a regex, so the year is any four digits
    (0000 too, which Python's date cannot hold) and 29 February passes in every year."""
    if not isinstance(value, str):
        return True
    match = re.fullmatch(r"[0-9]{4}-([0-9]{2})-([0-9]{2})", value)
    return bool(match) and bool(datetime.date.fromisoformat(f"2000-{match[1]}-{match[2]}"))


# -- JSON schemas ----------------------------------------------------------------------------

NAMES = st.sampled_from(["id", "name", "tags", "score", "city", "ok", "when", "mail", "nested"])
WORDS = st.text(alphabet=string.ascii_lowercase + " -", min_size=1, max_size=6)


@st.composite
def integers(draw) -> dict:
    # Both bounds: an unbounded integer lets a small model write digits until max_tokens.
    low = draw(st.integers(min_value=-1000, max_value=1000))
    high = draw(st.integers(min_value=low, max_value=low + 500))
    return {"type": "integer", "minimum": low, "maximum": high}


LEAVES = st.one_of(
    integers(),
    st.just({"type": "boolean"}),
    st.integers(min_value=1, max_value=8).map(lambda n: {"type": "string", "maxLength": n}),
    st.sampled_from(
        [
            {"type": "string", "format": "date"},
            {"type": "string", "format": "email", "maxLength": 24},
            {"type": "string", "format": "ipv4"},
            {"type": "string", "format": "uuid"},
        ]
    ),
    st.lists(st.one_of(WORDS, st.integers(-99, 99)), min_size=1, max_size=4, unique=True).map(
        lambda values: {"enum": values}
    ),
    st.just({"type": "null"}),
)


def arrays(items: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    return st.tuples(items, st.integers(0, 1), st.integers(1, 3)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": max(t[1], t[2])}
    )


@st.composite
def objects(draw, values: st.SearchStrategy[dict], max_properties: int = 3) -> dict:
    names = draw(st.lists(NAMES, min_size=1, max_size=max_properties, unique=True))
    properties = {name: draw(values) for name in names}
    required = [name for name in names if draw(st.booleans())]
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


# Objects and arrays of leaves, inside a top-level object: at most two levels deep.
INNER = st.one_of(LEAVES, arrays(LEAVES), objects(LEAVES, max_properties=2))
SCHEMAS = st.one_of(objects(INNER), arrays(objects(LEAVES, max_properties=2)))


@pytest.mark.slow
@SETTINGS
@given(schema=SCHEMAS, seed=SEEDS)
def test_json_schema_outputs_validate(live: Served, schema: dict, seed: int) -> None:
    reply = live.client().chat.completions.create(
        model=live.model,
        messages=[{"role": "user", "content": "Fill in this JSON for a customer record."}],
        n=2,
        temperature=1.0,
        seed=seed,
        max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    for choice in reply.choices:
        note(f"output: {choice.message.content!r} ({choice.finish_reason})")
        assert choice.finish_reason == "stop"
        jsonschema.validate(
            json.loads(choice.message.content), schema, format_checker=FORMAT_CHECKER
        )


# -- choices ---------------------------------------------------------------------------------

CHOICE_TEXT = st.text(
    alphabet=st.sampled_from(list(string.ascii_letters + " \"\\'{}|:é日本")), min_size=1, max_size=8
)


@pytest.mark.slow
@SETTINGS
@given(choices=st.lists(CHOICE_TEXT, min_size=1, max_size=5, unique=True), seed=SEEDS)
def test_guided_choice_outputs_are_choices(live: Served, choices: list[str], seed: int) -> None:
    reply = live.client().chat.completions.create(
        model=live.model,
        messages=[{"role": "user", "content": "Pick one."}],
        n=2,
        temperature=1.0,
        seed=seed,
        max_tokens=40,
        extra_body={"guided_choice": choices},
    )
    for choice in reply.choices:
        assert choice.message.content in choices
        assert choice.finish_reason == "stop"


# -- regular expressions ---------------------------------------------------------------------

# Constructs that mean the same to llguidance (Rust's regex syntax) and to Python's re, with
# bounded repetition so every match is short.
ATOMS = st.one_of(
    st.sampled_from(list(string.ascii_letters + string.digits + " ,_")),
    st.sampled_from(["[a-z]", "[A-Z]", "[0-9]", "[a-f0-9]", r"\.", r"\-", r"\(", "[xyz]"]),
)


@st.composite
def regexes(draw, depth: int = 0) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        if depth < 1 and draw(st.integers(0, 4)) == 0:
            left, right = draw(regexes(depth + 1)), draw(regexes(depth + 1))
            atom = f"(?:{left}|{right})"
        else:
            atom = draw(ATOMS)
        low = draw(st.integers(0, 2))
        high = draw(st.integers(low, low + 3))
        quantifier = draw(st.sampled_from(["", "?", f"{{{low},{max(high, 1)}}}", f"{{{high}}}"]))
        parts.append(atom + quantifier)
    return "".join(parts)


@pytest.mark.slow
@SETTINGS
@given(pattern=regexes(), seed=SEEDS)
def test_guided_regex_outputs_fullmatch(live: Served, pattern: str, seed: int) -> None:
    reply = live.client().completions.create(
        model=live.model,
        prompt="Here is a code:",
        n=2,
        temperature=1.0,
        seed=seed,
        max_tokens=60,
        extra_body={"guided_regex": pattern},
    )
    for choice in reply.choices:
        note(f"output: {choice.text!r} ({choice.finish_reason})")
        assert choice.finish_reason == "stop"
        assert re.fullmatch(pattern, choice.text)


# -- any budget ------------------------------------------------------------------------------

PATTERNS = st.sampled_from(["^[a-z]{1,8}$", "^[A-Z][a-z]+$", "^[0-9]{3}-[0-9]{4}$", "^(yes|no)$"])
FREE_LEAVES = st.one_of(
    st.just({"type": "string"}),  # unbounded: a small model may ramble until max_tokens
    st.just({"type": "integer"}),
    st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    PATTERNS.map(lambda p: {"type": "string", "pattern": p}),
    st.lists(WORDS, min_size=1, max_size=4, unique=True).map(lambda values: {"enum": values}),
)


@st.composite
def open_objects(draw, values: st.SearchStrategy[dict], max_properties: int = 3) -> dict:
    """Objects with any required set, closed or not (an open one lets the model add keys)."""
    names = draw(st.lists(NAMES, min_size=1, max_size=max_properties, unique=True))
    schema = {
        "type": "object",
        "properties": {name: draw(values) for name in names},
        "required": [name for name in names if draw(st.booleans())],
    }
    if draw(st.booleans()):
        schema["additionalProperties"] = False
    return schema


FREE_INNER = st.one_of(
    FREE_LEAVES,
    FREE_LEAVES.map(lambda s: {"type": "array", "items": s}),
    open_objects(FREE_LEAVES, max_properties=2),
)
FREE_SCHEMAS = st.one_of(
    open_objects(FREE_INNER), open_objects(FREE_INNER).map(lambda s: {"type": "array", "items": s})
)


def shortest_completion(live: Served, schema: dict) -> int:
    """Tokens of the schema's shortest completion, as the engine's budget walk finds it."""
    from sorai.engine.guided.budget import Scan
    from sorai.engine.params import GuidedSpec

    compiler = live.engine.engine.guided
    matcher = compiler.matcher(GuidedSpec(json_schema=json.dumps(schema)))
    walk = compiler.planner().shortest(matcher, Scan(), 512)
    assert walk.complete, schema
    return len(walk.tokens)


def check_budget(live: Served, schema: dict, max_tokens: int, seed: int) -> None:
    reply = live.client().chat.completions.create(
        model=live.model,
        messages=[{"role": "user", "content": "Fill in this JSON for a customer record."}],
        temperature=1.0,
        seed=seed,
        max_tokens=max_tokens,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    (choice,) = reply.choices
    note(f"output: {choice.message.content!r} ({choice.finish_reason})")
    if choice.finish_reason == "length":
        assert max_tokens < shortest_completion(live, schema)
        return
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), schema, format_checker=FORMAT_CHECKER)


BUDGETS = st.integers(min_value=8, max_value=200)


@settings(SETTINGS, max_examples=3)
@given(schema=FREE_SCHEMAS, max_tokens=st.integers(min_value=8, max_value=120), seed=SEEDS)
def test_any_budget_gives_a_valid_answer(
    live: Served, schema: dict, max_tokens: int, seed: int
) -> None:
    check_budget(live, schema, max_tokens, seed)


@pytest.mark.slow
@settings(SETTINGS, max_examples=30)
@given(schema=FREE_SCHEMAS, max_tokens=BUDGETS, seed=SEEDS)
def test_any_budget_gives_a_valid_answer_many(
    live: Served, schema: dict, max_tokens: int, seed: int
) -> None:
    check_budget(live, schema, max_tokens, seed)
