"""The seed's table (ABC's warranty: context 90 days, output 60 days) through the judge.

Two judges: sorai's real server with its small default model (smollm2-135m-instruct, the
session `client` fixture), for what a real judge guarantees here: every answer parses under
the {reason, score} schema with an integer score 1-5; and `NumberJudge`, a deterministic
judge double (see doubles.py), for the verdicts, because a 135M model's verdicts are not
reliable enough to assert.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sorai.apps.eval.data import load_rows
from sorai.apps.eval.judge import SCORE_SCHEMA, load_prompt, read_prompt
from sorai.apps.eval.registry import Context, register, resolve
from sorai.apps.eval.runner import Retry, Runner
from sorai.errors import SoraiError

from .conftest import write_jsonl
from .doubles import NumberJudge, warranty_rows


def evaluate(tmp_path: Path, rows: list[dict], metrics: list[str], judge, **kw) -> list[dict]:
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    runner = Runner(
        resolve(metrics),
        Context(judge, judge, kw.pop("prompts_dir", None)),
        tmp_path / "run",
        retry=Retry(sleep=lambda s: None),
        progress=False,
        **kw,
    )
    return runner.run(load_rows(str(data)))


def test_seed_table_with_the_small_default_judge(client, tmp_path):
    # The 60-day table only: on the corrected one this judge is no better (all 1 too, in one
    # row after a 300-character run of "1.1.1..."), and that row alone takes ~40 s on 2 cores.
    results = evaluate(tmp_path, warranty_rows(60), ["groundedness"], client, concurrency=5)
    print("\nsmollm2-135m-instruct groundedness on the seed's table (output 60 days):")
    assert len(results) == 5
    for r in results:
        print(f"  {r['index']}: {r.get('groundedness')} {r.get('groundedness_reason')!r}")
        assert "groundedness_error" not in r, r
        assert r["groundedness"] in {1.0, 2.0, 3.0, 4.0, 5.0}
        assert isinstance(r["groundedness_reason"], str)
        assert len(r["groundedness_reason"]) <= SCORE_SCHEMA["properties"]["reason"]["maxLength"]
        assert r["groundedness_result"] == ("pass" if r["groundedness"] >= 3 else "fail")


def test_seed_table_verdicts_with_the_judge_double(tmp_path):
    wrong = evaluate(
        tmp_path / "a", warranty_rows(60), ["groundedness", "faithfulness"], NumberJudge()
    )
    assert [r["groundedness_result"] for r in wrong] == ["fail"] * 5
    assert all(r["groundedness"] == 1.0 and "60" in r["groundedness_reason"] for r in wrong)
    assert [r["faithfulness"] for r in wrong] == [0.0] * 5
    right = evaluate(
        tmp_path / "b", warranty_rows(90), ["groundedness", "faithfulness"], NumberJudge()
    )
    assert [r["groundedness_result"] for r in right] == ["pass"] * 5
    assert [r["faithfulness"] for r in right] == [1.0] * 5
    assert right[0]["faithfulness_reason"] == "1 of 1 statements supported"


def test_groundedness_without_a_query_uses_its_own_prompt(tmp_path):
    judge = NumberJudge()
    rows = [{k: v for k, v in r.items() if k != "query"} for r in warranty_rows(60)[:1]]
    (result,) = evaluate(tmp_path, rows, ["groundedness"], judge)
    assert result["groundedness_result"] == "fail"
    assert resolve(["groundedness"])[0].needs == ("context", "response")


def test_prompt_override_is_used_and_changes_the_cache_key(tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "relevance.md").write_text(
        "[system]\nBe strict.\n[user]\nQUERY:\n{{ query }}\n\nRESPONSE:\n{{ response }}!\n"
    )
    default, custom = load_prompt("relevance"), load_prompt("relevance", str(prompts))
    assert default.path.startswith("<built-in>") and custom.path == str(prompts / "relevance.md")
    assert default.digest != custom.digest
    assert custom.render(query="q", response="r") == [
        {"role": "system", "content": "Be strict."},
        {"role": "user", "content": "QUERY:\nq\n\nRESPONSE:\nr!"},
    ]
    (prompts / "broken.md").write_text("no sections here {{ response }}")
    with pytest.raises(SoraiError, match="broken.md: no \\[user\\] section"):
        read_prompt(str(prompts / "broken.md"))


def test_custom_evaluators_function_and_prompt(tmp_path):
    register("mentions_days", lambda row: {"score": "days" in row["response"], "reason": "looked"})
    prompt = tmp_path / "numbers_ok.md"
    prompt.write_text("[user]\nCONTEXT:\n{{ context }}\n\nRESPONSE:\n{{ response }}\n")
    evaluator = register("numbers_ok", prompt=str(prompt))
    assert evaluator.needs == ("context", "response") and evaluator.kind == "judge"
    (r,) = evaluate(tmp_path, warranty_rows(60)[:1], ["mentions_days", "numbers_ok"], NumberJudge())
    assert (r["mentions_days"], r["mentions_days_reason"]) == (1.0, "looked")
    assert (r["numbers_ok"], r["numbers_ok_result"]) == (1.0, "fail")
    with pytest.raises(SoraiError, match="unknown metric 'groundness'"):
        resolve(["groundness"])
