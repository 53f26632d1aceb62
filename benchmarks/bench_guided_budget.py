"""Structured answers under tight max_tokens on the default model: how many parse and validate,
how many were closed early, and what the budget check costs per token.

    python benchmarks/bench_guided_budget.py [--seeds 3] [--rounds 6]

Per kind (json_schema with open objects and unbounded strings, json_object, a named tool call,
a regex, a choice) and for a few max_tokens each, `--seeds` answers at temperature 1: printed,
the answers that end with "stop" (or "tool_calls") and validate, and those with stop_reason
"budget". Then the same JSON-schema request (64 tokens) with the budget check on and off, rounds
interleaved: median ms per generated token of each and their ratio. Also printed: CPU flags and
the load average (timings are only comparable on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import jsonschema

import sorai
from sorai import hub
from sorai.engine.guided.compile import GrammarCompiler

RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
SENTENCE = r"[A-Z][A-Za-z ,]+ [0-9]{2}\."
CHOICES = ["yes, a long and winding answer to the question", "ok"]
MESSAGES = [{"role": "user", "content": "A person as JSON with name, age and city."}]


def _valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def _closed_arguments(out) -> bool:
    schema = {**TOOL["function"]["parameters"], "additionalProperties": False}
    return bool(out.tool_calls) and _valid(out.tool_calls[0]["function"]["arguments"], schema)


KINDS = {
    "json_schema": (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": RECORD}}},
        (16, 24, 32, 48),
        lambda out: _valid(out.text, RECORD),
    ),
    "json_object": (
        {"response_format": {"type": "json_object"}},
        (4, 8, 16, 32),
        lambda out: _valid(out.text, {"type": "object"}),
    ),
    "tool_call": (
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
        (16, 24, 32),
        _closed_arguments,
    ),
    "regex": (
        {"guided_regex": SENTENCE},
        (6, 8, 12),
        lambda out: bool(re.fullmatch(SENTENCE, out.text)),
    ),
    "choice": ({"guided_choice": CHOICES}, (2, 3, 4), lambda out: out.text in CHOICES),
}


def _cpu_flags() -> str:
    with open("/proc/cpuinfo") as f:
        line = next((x for x in f if x.startswith("flags")), "")
    flags = {f for f in line.split() if f.startswith(("avx2", "avx512", "amx"))}
    return " ".join(sorted(flags)) or "(none of avx2/avx512/amx)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        print(f"cpu flags: {_cpu_flags()} | load average: {' '.join(f.read().split()[:3])}")
    llm = sorai.load(hub.resolve(hub.DEFAULT_MODEL))
    for name, (options, budgets, check) in KINDS.items():
        good = closed = total = 0
        for max_tokens in budgets:
            for seed in range(args.seeds):
                out = llm.chat(
                    MESSAGES, max_tokens=max_tokens, temperature=1.0, seed=seed, **options
                )
                total += 1
                good += out.finish_reason in ("stop", "tool_calls") and check(out)
                closed += out.stop_reason == "budget"
        print(f"{name:12s} max_tokens {budgets}: valid {good}/{total}, closed early {closed}")
    guided = llm.engine.guided
    with_budget = GrammarCompiler.budget.__get__(guided)
    story = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    fmt = {"type": "json_schema", "json_schema": {"schema": story}}
    times: dict[str, list[float]] = {"budget": [], "no budget": []}
    for i in range(args.rounds):
        for label in ("budget", "no budget") if i % 2 == 0 else ("no budget", "budget"):
            guided.budget = with_budget if label == "budget" else (lambda spec: None)
            start = time.perf_counter()
            out = llm.chat(MESSAGES, max_tokens=64, temperature=1.0, seed=i, response_format=fmt)
            times[label].append((time.perf_counter() - start) / max(1, out.completion_tokens))
    guided.budget = with_budget
    for label, values in times.items():
        print(f"{label:10s} median {statistics.median(values) * 1000:.1f} ms/token")
    ratio = statistics.median(times["budget"]) / statistics.median(times["no budget"])
    print(f"ratio budget / no budget: {ratio:.3f}")


if __name__ == "__main__":
    main()
