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
from sorai.apps.eval.judge import JudgeError, judge, load_prompt, read_prompt
from sorai.apps.eval.registry import Context, register, resolve
from sorai.apps.eval.runner import Retry, Runner
from sorai.apps.eval.verdicts import answers, grounded_in, split_claims
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


def test_the_small_default_judge_separates_the_seed_table_s_right_and_wrong_answers(
    client, tmp_path
):
    # Before, the free 1-5 answer of the 135M model scored all of these 1, right or wrong.
    wrong = evaluate(tmp_path / "a", warranty_rows(60), ["groundedness"], client)
    right = evaluate(tmp_path / "b", warranty_rows(90), ["groundedness"], client)
    print("\nsmollm2-135m-instruct groundedness on the seed's table (60 wrong, 90 right):")
    for r in wrong + right:
        print(f"  {r['response']!r}: {r.get('groundedness')} {r.get('groundedness_reason')!r}")
        assert "groundedness_error" not in r, r
        assert 1.0 <= r["groundedness"] <= 5.0
        assert r["groundedness_result"] == ("pass" if r["groundedness"] >= 3 else "fail")
    assert max(r["groundedness"] for r in wrong) < min(r["groundedness"] for r in right)
    assert [r["groundedness_result"] for r in wrong + right] == ["fail"] * 5 + ["pass"] * 5
    assert "60 days" in wrong[0]["groundedness_reason"]


def test_claims_and_their_evidence():
    assert split_claims("It lasts 90 days. Repairs are free!\n- Call us") == [
        "It lasts 90 days.",
        "Repairs are free!",
        "Call us",
    ]
    assert split_claims("保証は90日です。修理は無料です。") == [
        "保証は90日です。",
        "修理は無料です。",
    ]
    context = "The warranty period is 90 days. Repairs within the period are free of charge."
    check = grounded_in(context)
    assert check("The warranty period is 90 days.") == 1.0
    assert check("The warranty period is 60 days.") == 0.0  # a number not in the context
    assert check("Repairs within the period are not free.") < 0.5  # a negation of its own
    assert check("The product is made in France.") == 0.0  # nothing of it in the context
    assert answers("How long is the warranty?")("The warranty lasts 90 days.") == 1.0
    assert answers("How long is the warranty?")("Bananas are yellow.") == 0.0


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
    (prompts / "broken.md").write_text("[system]\nno user section {{ response }}")
    with pytest.raises(SoraiError, match="broken.md: no \\[user\\] section"):
        read_prompt(str(prompts / "broken.md"))


def test_other_people_s_prompt_files(tmp_path):
    # An Azure-style .prompty: YAML front matter, `system:` / `user:` lines.
    prompty = tmp_path / "ground.prompty"
    prompty.write_text(
        "---\nname: Groundedness\nmodel:\n  api: chat\n---\nsystem:\nYou judge.\n\n"
        "user:\nCONTEXT: {{context}}\nRESPONSE: {{response}}\n",
        encoding="utf-8-sig",  # with a BOM, as Windows editors write
    )
    prompt = read_prompt(str(prompty))
    assert prompt.variables() == {"context", "response"}
    assert prompt.render(context="c", response="r") == [
        {"role": "system", "content": "You judge."},
        {"role": "user", "content": "CONTEXT: c\nRESPONSE: r"},
    ]
    # Elsewhere a line "User:" is the prompt's own text, not a section.
    transcript = tmp_path / "transcript.md"
    transcript.write_text("[system]\nJudge.\n[user]\nUser:\n{{ query }}\nBot:\n{{ response }}")
    assert read_prompt(str(transcript)).render(query="q", response="r")[1] == {
        "role": "user",
        "content": "User:\nq\nBot:\nr",
    }
    # A file without sections is all user message.
    plain = tmp_path / "plain.md"
    plain.write_text("Is {{ response }} polite? Score 1-5.")
    assert read_prompt(str(plain)).render(response="Hi") == [
        {"role": "user", "content": "Is Hi polite? Score 1-5."}
    ]
    # A variable the judge is not given fails at load, naming the file, not on every row.
    other = tmp_path / "other.md"
    other.write_text("[user]\n{{ question }} -> {{ response }}")
    with pytest.raises(SoraiError, match="other.md: uses \\{\\{ question \\}\\}; a prompt sees"):
        read_prompt(str(other))
    # So does a broken override in --prompts DIR, before any row is judged.
    (tmp_path / "relevance.md").write_text("[user]\n{{ response }")
    with pytest.raises(SoraiError, match="relevance.md:2: "):
        load_prompt("relevance", str(tmp_path))
    with pytest.raises(SoraiError, match="relevance.md:2: "):
        Runner(
            resolve(["relevance"]),
            Context(NumberJudge(), None, str(tmp_path)),
            tmp_path / "r",
            progress=False,
        ).run([])


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


class LooseJudge:
    """A judge double standing for an endpoint that ignores the schema's types."""

    model = "loose-double"

    def __init__(self, answer):
        self.answer = answer

    def chat_json(self, messages, schema, name="answer", **kw):
        return self.answer


@pytest.mark.parametrize("given", ["4", " 4 ", "4.0", 4.0, 4])
def test_a_score_given_as_text_by_a_loose_endpoint_is_read(given):
    verdict = judge(
        LooseJudge({"reason": "ok", "score": given}), load_prompt("fluency"), {"response": "Hi."}
    )
    assert verdict.score == 4.0


@pytest.mark.parametrize("given", ["6", "four", "4/5", True, None, 0])
def test_a_score_out_of_range_is_the_judge_s_error(given):
    with pytest.raises(JudgeError, match="no score in 1-5"):
        judge(
            LooseJudge({"reason": "ok", "score": given}),
            load_prompt("fluency"),
            {"response": "Hi."},
        )


def test_choice_probabilities_read_the_first_token_of_the_default_model(client):
    messages = [{"role": "user", "content": "Is Paris in France? Answer yes or no."}]
    found = client.choice_probabilities(messages, ["yes", "no"])
    assert set(found) == {"yes", "no"} and sum(found.values()) == pytest.approx(1.0)
    # No choice among the top tokens: uniform, not a division by zero.
    none = client.choice_probabilities(messages, ["zzzqx", "qqxz"])
    assert none == {"zzzqx": 0.5, "qqxz": 0.5}


def test_the_default_model_s_p_yes_weighs_nothing() -> None:
    """Tuned on bench_judge.py: the default model's P(yes) lowers the AUROC, so its verdicts
    are the evidence check's and it is not asked; other judges' P(yes) weighs MODEL_WEIGHT."""
    from sorai.apps.eval.judge import load_prompt
    from sorai.apps.eval.verdicts import MODEL_WEIGHT, claim_verdicts, grounded_in, model_weight

    assert model_weight("smollm2-135m-instruct") == 0.0
    assert model_weight("/models/SmolLM2-135M-Instruct-Q4_1.gguf") == 0.0
    assert model_weight("gpt-4o-mini") == MODEL_WEIGHT > 0

    class DefaultJudge:  # a double: asking it would fail, as the default is not to be asked
        model = "smollm2-135m-instruct"

        def choice_probabilities(self, messages, choices, **kwargs):
            raise AssertionError("the default model's P(yes) is not asked")

    row = {"context": "The warranty lasts 90 days.", "response": "The warranty lasts 60 days."}
    prompt = load_prompt("groundedness_claim")
    (verdict,) = claim_verdicts(DefaultJudge(), prompt, row, grounded_in(row["context"]))
    assert verdict.support == verdict.evidence == 0.0


def test_content_words_match_across_inflections_and_drop_stop_words() -> None:
    """Seen on the README's ask example: "rotated" did not match "Rotate", nor "key" "keys";
    and a stop word stemmed ("there" -> "ther") passed as content."""
    from sorai.apps.eval.verdicts import content_words

    assert content_words("How often are the keys rotated?") == content_words("Rotate the key")
    assert content_words("prices") == content_words("price") == {"pric"}
    assert not content_words("there were these and those")
    assert content_words("class") == {"class"}
