"""classify with the seed's prompt on the embedded default model: the label is always one of
the set and the confidences are probabilities."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from sorai.apps.client import Client
from sorai.apps.skills.base import SkillError
from sorai.apps.skills.classify import classify, classify_many, fit_vote, label_scores
from sorai.apps.skills.classify_embed import (
    TEMPERATURES,
    expected_calibration_error,
    fit,
    ngram_vectors,
)
from sorai.apps.skills.extract import extract
from sorai.apps.skills.sentiment import sentiment_by_sentence

# The seed: "classify customer inquiries following these examples".
INSTRUCTION = "顧客の問い合わせを以下の例にそって分類してください。"
EXAMPLES = [
    (
        "舞黒ダイニングを 3/15 に 4 名で、和食のコースで予約お願いします。子供が 1 名居ます。",
        "レストラン予約",
    ),
    (
        "2月10日 19:20 成田発、シアトル行きののユナイテッド航空 616 便を"
        "エコノミークラスで6枚ください。",
        "航空機の手配",
    ),
    ("オペレーターにつないでいただけませんか。", "その他"),
]
LABELS = ["レストラン予約", "航空機の手配", "その他"]
NEW = [
    "全日空の羽田発、ロサンゼルス行きで、10/20 で手配できますか。",
    "来週の土曜日に 2 名でイタリアンのディナーを予約したいです。",
    "領収書を再発行してもらえますか。",
    "Book me a window seat on the morning flight to Osaka.",
]


def test_seed_prompt_labels_are_always_in_the_set(client: Client) -> None:
    results = classify_many(client, NEW, LABELS, EXAMPLES, INSTRUCTION)
    assert len(results) == len(NEW)
    for result in results:
        assert result.label in LABELS
        assert result.confidence is not None and 0.0 <= result.confidence <= 1.0
        assert set(result.scores) == set(LABELS)
        assert math.isclose(sum(result.scores.values()), 1.0, rel_tol=1e-6)
        assert all(0.0 <= p <= 1.0 for p in result.scores.values())
        assert result.scores[result.label] == result.confidence


def test_labels_with_descriptions(client: Client) -> None:
    result = classify(
        client,
        "The screen of my phone cracked.",
        {"hardware": "a device is broken", "billing": "money, invoices, refunds"},
    )
    assert result.label in ("hardware", "billing")


def test_bad_arguments() -> None:
    with pytest.raises(SkillError, match="at least two labels"):
        classify(None, "x", ["only"])  # type: ignore[arg-type]
    with pytest.raises(SkillError, match="duplicate labels"):
        classify(None, "x", ["a", "a"])  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["", " \n\t "])
def test_an_empty_text_is_an_error_not_a_guess(text: str) -> None:
    """Nothing to read: no request (the double would answer a label) and a clear error."""
    with pytest.raises(SkillError, match="nothing to classify: the text is empty"):
        classify(_CloudEndpointDouble('{"label": "a"}'), text, ["a", "b"])
    with pytest.raises(SkillError, match="nothing to extract from: the text is empty"):
        extract(_CloudEndpointDouble('{"a": "x"}'), text, {"a": "the a"})
    with pytest.raises(SkillError, match="nothing to score: the text is empty"):
        sentiment_by_sentence(_CloudEndpointDouble('{"label": "neutral"}'), text)


class _Top:
    def __init__(self, token: str, logprob: float, top=()) -> None:
        self.token, self.logprob, self.top_logprobs = token, logprob, list(top)


def test_label_scores_by_hand() -> None:
    """Scores from a hand-made logprobs list: the label starts inside the token ' "fl'."""
    answer = '{"label": "flight"}'
    alternatives = [_Top(' "fl', math.log(0.5)), _Top(' "re', math.log(0.3)), _Top(" {", -1.0)]
    content = [
        _Top('{"', 0.0),
        _Top("label", 0.0),
        _Top('":', 0.0),
        _Top(' "fl', math.log(0.5), alternatives),
        _Top('ight"}', 0.0),
    ]
    scores = label_scores(content, answer, ["flight", "restaurant", "other"])
    assert scores == pytest.approx({"flight": 0.5 / 0.8, "restaurant": 0.3 / 0.8, "other": 0.0})


def test_logprob_bytes_join_into_the_text(client: Client) -> None:
    """The confidence reads labels from the tokens' bytes: a Japanese character spans
    several byte-level tokens, whose bytes must join into the answer's UTF-8."""
    response = client.chat(
        [{"role": "user", "content": "「こんにちは」と言ってください。"}],
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = response.choices[0]
    joined = b"".join(bytes(t.bytes) for t in choice.logprobs.content)
    text = choice.message.content.encode("utf-8")
    # max_tokens may cut the last character: the text drops its bytes, the tokens keep them.
    assert joined.startswith(text) and len(joined) - len(text) < 4
    assert joined.decode("utf-8", errors="ignore") == choice.message.content
    assert any("\ufffd" in t.token for t in choice.logprobs.content)  # split characters exist


def _content(*tokens: _Top) -> list[_Top]:
    """A logprobs list whose label starts after `{"label": "` (the first three tokens)."""
    return [_Top('{"', 0.0), _Top("label", 0.0), _Top('": "', 0.0), *tokens]


def test_labels_sharing_a_first_token_are_told_apart_by_the_next() -> None:
    """ "New York" and "New Jersey" share the token "New": its mass goes to them as the model
    splits the next token, not half each."""
    content = _content(
        _Top("New", math.log(0.6), [_Top("New", math.log(0.6)), _Top("Bo", math.log(0.2))]),
        _Top(" York", math.log(0.25), [_Top(" Jersey", math.log(0.75))]),
        _Top('"}', 0.0),
    )
    scores = label_scores(content, '{"label": "New York"}', ["New York", "New Jersey", "Boston"])
    assert scores == pytest.approx(
        {"New York": 0.6 * 0.25 / 0.8, "New Jersey": 0.6 * 0.75 / 0.8, "Boston": 0.2 / 0.8}
    )


def test_a_label_that_is_a_prefix_of_another_ends_at_its_quote() -> None:
    """ "New" and "New York": after "New" the closing quote means "New", " York" the other."""
    content = _content(
        _Top("New", 0.0),
        _Top('"}', math.log(0.9), [_Top(" York", math.log(0.1))]),
    )
    scores = label_scores(content, '{"label": "New"}', ["New", "New York"])
    assert scores == pytest.approx({"New": 0.9, "New York": 0.1})


def test_label_scores_read_json_escapes_in_labels() -> None:
    """A label with a quote is written escaped in the JSON answer."""
    content = _content(
        _Top('say \\"hi\\""}', math.log(0.7), [_Top("bye", math.log(0.3))]),
    )
    scores = label_scores(content, '{"label": "say \\"hi\\""}', ['say "hi"', "bye"])
    assert scores == pytest.approx({'say "hi"': 0.7, "bye": 0.3})


class _CloudEndpointDouble:
    """Test double for an endpoint that ignores response_format and reports no logprobs: it
    answers each chat with the next of `answers`."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)

    def chat(self, messages, **kwargs):
        message = SimpleNamespace(content=self.answers.pop(0))
        return SimpleNamespace(
            choices=[SimpleNamespace(message=message, logprobs=None, finish_reason="stop")]
        )


@pytest.mark.parametrize(
    "answer",
    ['```json\n{"label": "billing"}\n```', 'Sure! {"label": "billing"}', "billing", '"billing"\n'],
)
def test_an_endpoint_that_ignores_the_schema_still_gives_the_label(answer: str) -> None:
    result = classify(_CloudEndpointDouble(answer), "Refund me.", ["billing", "hardware"])
    assert (result.label, result.confidence, result.scores) == ("billing", None, {})


def test_an_answer_that_is_no_label_is_a_clear_error() -> None:
    with pytest.raises(SkillError, match="answered 'weather', not one of"):
        classify(_CloudEndpointDouble('{"label": "weather"}'), "x", ["billing", "hardware"])
    with pytest.raises(SkillError, match="not a label: 'I cannot help'"):
        classify(_CloudEndpointDouble("I cannot help"), "x", ["billing", "hardware"])


def test_the_answer_has_room_for_a_long_japanese_label() -> None:
    """Up to one token per UTF-8 byte: a 30-character Japanese label is 90 bytes."""
    long_label = "国際線の航空券の予約と座席の指定および手荷物に関するお問い合わせ"
    endpoint = _CloudEndpointDouble(json.dumps({"label": long_label}, ensure_ascii=False))
    seen = {}
    chat = endpoint.chat
    endpoint.chat = lambda messages, **kwargs: seen.update(kwargs) or chat(messages, **kwargs)
    assert classify(endpoint, "座席を指定したい", [long_label, "その他"]).label == long_label
    assert seen["max_tokens"] >= len(f'{{"label": "{long_label}"}}'.encode())


def test_another_spelling_of_a_shared_prefix_splits_as_the_path_taken() -> None:
    """ "Ne" begins both New York and New Jersey like "New": its mass follows the split the
    model makes after "New" (1:3), not half each."""
    content = _content(
        _Top("New", math.log(0.5), [_Top("Ne", math.log(0.3)), _Top("Bo", math.log(0.2))]),
        _Top(" York", math.log(0.25), [_Top(" Jersey", math.log(0.75))]),
        _Top('"}', 0.0),
    )
    scores = label_scores(content, '{"label": "New York"}', ["New York", "New Jersey", "Boston"])
    assert scores == pytest.approx({"New York": 0.2, "New Jersey": 0.6, "Boston": 0.2})


# -- the examples' vote -----------------------------------------------------------------------


def test_readme_inquiries_get_their_labels_by_default(client: Client) -> None:
    """The README's flight inquiry: the model alone answered その他; the examples' vote (with the
    model asked where the vote is unsure) labels all four."""
    results = classify_many(client, NEW, LABELS, EXAMPLES, INSTRUCTION)
    assert [r.label for r in results] == [
        "航空機の手配",
        "レストラン予約",
        "その他",
        "航空機の手配",
    ]
    assert results[0].method == "embedding" and results[0].confidence > 0.5


def test_embedding_method_needs_no_model_answer(client: Client) -> None:
    result = classify(client, NEW[0], LABELS, EXAMPLES, INSTRUCTION, method="embedding")
    assert result.method == "embedding" and result.label == "航空機の手配"
    assert math.isclose(sum(result.scores.values()), 1.0, rel_tol=1e-6)


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(SkillError, match="unknown classify method 'knn'.*auto, llm, embedding"):
        classify(None, "x", ["a", "b"], method="knn")  # type: ignore[arg-type]


def test_an_example_with_an_unknown_label_is_an_error() -> None:
    with pytest.raises(SkillError, match="'weather' is not one of the labels"):
        fit_vote(None, ["a", "b"], [("x", "weather")])  # type: ignore[arg-type]


# Written for these tests: three topics, four examples each, no encoder (n-grams alone).
TOPICS = {
    "料理": ["カレーの作り方", "パスタを茹でる時間", "味噌汁の出汁の取り方", "ケーキを焼く温度"],
    "天気": ["明日の天気は晴れ", "雨が降りそうです", "台風が近づいています", "今日の気温と天気"],
    "電車": ["電車が遅れています", "新宿駅で乗り換え", "終電の時刻を知りたい", "電車の定期券"],
}


def test_ngram_vote_fits_on_japanese_without_an_encoder() -> None:
    examples = [(t, label) for label, texts in TOPICS.items() for t in texts]
    vote = fit({name: "" for name in TOPICS}, examples)
    assert vote.feature == "ngram" and vote.loo_accuracy is not None
    assert vote.loo_accuracy > 0.5  # chance is 1/3
    assert TEMPERATURES[0] <= vote.temperature <= TEMPERATURES[-1]
    (p,) = vote.probabilities(["週末の天気が心配"])
    assert max(p, key=p.__getitem__) == "天気"
    assert math.isclose(sum(p.values()), 1.0, rel_tol=1e-9)


def test_ngram_vectors_are_unit_length_over_the_documents_vocabulary() -> None:
    docs, texts = ngram_vectors(["abc", "abd"], ["abc", "zzz"])
    assert np.allclose(np.linalg.norm(docs, axis=1), 1.0)
    assert math.isclose(float(texts[0] @ docs[0]), 1.0, rel_tol=1e-9)
    assert not texts[1].any()  # nothing in common with the documents


def test_expected_calibration_error_by_hand() -> None:
    # Bin 0.9: two answers at 0.9, one right (gap 0.4); bin 0.6: one right at 0.6 (gap 0.4).
    assert math.isclose(expected_calibration_error([0.9, 0.9, 0.6], [True, False, True]), 0.4)
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0


def test_cli_method_flag(client: Client, capsys) -> None:
    from sorai.cli import main

    argv = ["classify", NEW[0], "--labels", ",".join(LABELS), "--instruction", INSTRUCTION]
    argv += [flag for text, label in EXAMPLES for flag in ("--example", f"{text}=>{label}")]
    argv += ["--url", str(client.openai.base_url), "--api-key", client.openai.api_key, "--json"]
    decided = {}
    for method in ("auto", "llm", "embedding"):
        assert main([*argv, "--method", method]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        decided[method] = (row["label"], row["method"])
    assert decided["auto"] == ("航空機の手配", "embedding")
    assert decided["embedding"] == ("航空機の手配", "embedding")
    assert decided["llm"][1] == "llm"
