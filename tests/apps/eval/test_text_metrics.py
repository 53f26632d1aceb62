"""Text, classification and extraction metrics against values computed by hand."""

from __future__ import annotations

import pytest

from sorai.apps.eval.classification import classification
from sorai.apps.eval.extraction import RecordError, field_counts
from sorai.apps.eval.text_metrics import (
    bleu,
    cosine,
    exact_match,
    lcs_length,
    rouge_l,
    token_f1,
    tokenize,
)

EN_PRED = "The warranty lasts 60 days"
EN_REF = "The warranty lasts 90 days"
JA_PRED = "保証期間は６０日です。"  # full-width digits: NFKC makes them 60
JA_REF = "保証期間は90日です。"


def test_tokenize_cjk_per_character_latin_per_word_punctuation_dropped():
    assert tokenize(JA_PRED) == ["保", "証", "期", "間", "は", "60", "日", "で", "す"]
    assert tokenize("ABC製品の保証、OK?") == ["abc", "製", "品", "の", "保", "証", "ok"]
    assert tokenize("保修期为90天。") == ["保", "修", "期", "为", "90", "天"]
    assert tokenize("보증 기간") == ["보", "증", "기", "간"]
    assert tokenize("ｶﾀｶﾅ and Résumé!") == ["カ", "タ", "カ", "ナ", "and", "résumé"]
    assert tokenize("東京スカイツリー") == ["東", "京", "ス", "カ", "イ", "ツ", "リ", "ー"]


def test_exact_match_ignores_case_punctuation_spacing_only():
    assert exact_match("The warranty lasts 90 days.", "the warranty  lasts 90 days") == 1.0
    assert exact_match(EN_PRED, EN_REF) == 0.0
    assert exact_match("９０日", "90日") == 1.0
    assert exact_match(JA_PRED, JA_REF) == 0.0


def test_token_f1_by_hand():
    # 4 of 5 tokens shared each way: P = R = 4/5.
    assert token_f1(EN_PRED, EN_REF) == pytest.approx(0.8)
    # 8 of 9 characters shared.
    assert token_f1(JA_PRED, JA_REF) == pytest.approx(8 / 9)
    # 東京タワー (5) vs 東京スカイツリー (8) share 東, 京, ー: P 3/5, R 3/8.
    assert token_f1("東京タワー", "東京スカイツリー") == pytest.approx(2 * 0.6 * 0.375 / 0.975)
    assert token_f1("", "") == 1.0
    assert token_f1("something", "") == 0.0


def test_rouge_l_by_hand_counts_order_and_keeps_non_ascii():
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4
    assert rouge_l(EN_PRED, EN_REF) == pytest.approx(0.8)
    # Same bag of tokens, different order: F1 is 1, ROUGE-L only the LCS "the warranty lasts".
    shuffled = "days 90 the warranty lasts"
    assert token_f1(shuffled, EN_REF) == pytest.approx(1.0)
    assert rouge_l(shuffled, EN_REF) == pytest.approx(3 / 5)
    # rouge-score's default tokenizer drops non-ASCII and would score this 0 or 1.
    assert rouge_l(JA_PRED, JA_REF) == pytest.approx(8 / 9)
    assert rouge_l("東京タワー", "東京スカイツリー") == pytest.approx(2 * 0.6 * 0.375 / 0.975)


def test_bleu_by_hand():
    # Precisions 4/5; (2+1)/(4+1); (1+1)/(3+1); (0+1)/(2+1); no brevity penalty.
    assert bleu(EN_PRED, EN_REF) == pytest.approx((0.8 * 0.6 * 0.5 / 3) ** 0.25)
    # 2 tokens against 5: every precision 1, brevity penalty exp(1 - 5/2).
    assert bleu("90 days", EN_REF) == pytest.approx(2.718281828 ** (1 - 5 / 2))
    # 8/9; (6+1)/(8+1); (4+1)/(7+1); (2+1)/(6+1) = 15/81 under the fourth root.
    assert bleu(JA_PRED, JA_REF) == pytest.approx((15 / 81) ** 0.25)
    assert bleu(EN_REF, EN_REF) == pytest.approx(1.0)
    assert bleu("nothing shared", EN_REF) == 0.0


def test_cosine():
    assert cosine([1, 0], [0, 1]) == 0.0
    assert cosine([1, 2], [2, 4]) == pytest.approx(1.0)
    assert cosine([1, 1], [1, 0]) == pytest.approx(2**-0.5)
    assert cosine([0, 0], [1, 0]) == 0.0


def test_classification_by_hand():
    predicted = ["positive", "Positive ", "negative", "neutral", "negative"]
    expected = ["positive", "negative", "negative", "neutral", "positive"]
    c = classification(predicted, expected)
    assert c.labels == ["negative", "neutral", "positive"]
    # rows: expected; columns: predicted
    assert c.confusion == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    assert c.accuracy == pytest.approx(3 / 5)
    # F1: negative 1/2, neutral 1, positive 1/2.
    assert c.macro_f1 == pytest.approx(2 / 3)
    assert c.per_label["negative"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}


def test_extraction_field_level_by_hand():
    response = {"name": "Ann Lee", "phone": "555-0100", "day": "Monday", "city": None}
    truth = {"name": "ann  lee", "phone": "555-0199", "day": "Monday", "email": "ann@x.com"}
    counts = field_counts(response, truth)
    # predicted name, phone, day (city is null); expected 4; right: name, day.
    assert (counts.correct, counts.predicted, counts.expected) == (2, 3, 4)
    scores = counts.scores()
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(1 / 2)
    assert scores["f1"] == pytest.approx(4 / 7)
    assert counts.by_field["phone"] == [0, 1, 1]
    assert counts.by_field["email"] == [0, 0, 1]
    # JSON text is read; "90" and 90 agree.
    assert field_counts('{"days": "90"}', {"days": 90}).scores()["f1"] == 1.0
    with pytest.raises(RecordError, match="response is not JSON"):
        field_counts("ninety", {"days": 90})
