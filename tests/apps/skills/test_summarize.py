"""summarize and sentiment on the embedded default model (structure and paths; the wording is
the small model's), and the text helpers by hand.

The real model's map-reduce runs (a text five times its window: tens of seconds of prefill even
with a 1024-token window) are in the slow tier; the default tier walks the same path with a
scripted model (a test double) and summarizes directly on the real model."""

from __future__ import annotations

import random

import pytest

from sorai.apps.client import Client
from sorai.apps.skills.base import SkillError
from sorai.apps.skills.sentiment import sentiment, sentiment_by_sentence
from sorai.apps.skills.summarize import (
    MIN_NOTES,
    NOTES,
    PROMPT_OVERHEAD,
    STYLES,
    checked_summary,
    split,
    summarize,
)
from sorai.apps.skills.summary_checks import cut_loop, has_loop, key_sentences, numbers
from sorai.apps.text import estimate_tokens, sentences, truncate_words, word_count
from tests.apps.agent.scripted import ScriptedModel

TOPICS = ["the quarterly sales report", "the new office in Osaka", "the customer survey"]


def long_text(tokens: int) -> str:
    """Paragraphs of plain business sentences, about `tokens` estimated tokens."""
    rng = random.Random(0)
    paragraphs, total = [], 0
    while total < tokens:
        topic = rng.choice(TOPICS)
        paragraph = " ".join(
            f"In week {rng.randint(1, 52)} the team reviewed {topic} and found that revenue "
            f"grew by {rng.randint(1, 30)} percent while costs fell by {rng.randint(1, 9)} "
            "percent."
            for _ in range(5)
        )
        paragraphs.append(paragraph)
        total += estimate_tokens(paragraph)
    return "\n\n".join(paragraphs)


def check_map_reduce(client: Client, context: int) -> None:
    text = long_text(5 * context)
    assert estimate_tokens(text) >= 5 * context
    window = None if context == client.context_length() else context
    summary = summarize(client, text, style="bullets", max_words=60, context_tokens=window)
    assert summary.path == "map-reduce"
    assert summary.chunks >= 5 and summary.levels >= 1
    assert 0 < summary.words <= 60
    assert word_count(summary.text) == summary.words


@pytest.mark.slow
def test_a_text_five_times_the_models_context_goes_map_reduce(client: Client) -> None:
    """The model's own window (8192 tokens: ~41k tokens of text, minutes on 2 cores)."""
    context = client.context_length()
    assert context is not None  # sorai reports max_model_len
    check_map_reduce(client, context)


@pytest.mark.slow
def test_a_text_five_times_a_small_window_goes_map_reduce(client: Client) -> None:
    """The same path with the window set to 1024 tokens (half a minute on 2 cores)."""
    check_map_reduce(client, 1024)


def test_map_reduce_notes_every_piece_then_summarizes_the_notes() -> None:
    """The map-reduce path with a scripted model: one notes request per piece of the split
    text, then one request over the joined notes for the summary in the asked style."""
    text = long_text(5 * 1024)
    answer_tokens = 60 * 2 + 16
    budget = 1024 - PROMPT_OVERHEAD - answer_tokens
    pieces = split(text, budget)
    notes = "- Revenue grew and costs fell."
    final = "- Revenue grew in most weeks.\n- Costs fell."
    model = ScriptedModel([notes] * len(pieces) + [final])
    summary = summarize(model, text, style="bullets", max_words=60, context_tokens=1024)
    assert (summary.path, summary.chunks, summary.levels) == ("map-reduce", len(pieces), 1)
    assert summary.chunks >= 5
    assert (summary.text, summary.words) == (final, word_count(final))
    *mapped, reduced = model.requests
    assert sorted(r["messages"][1]["content"] for r in mapped) == sorted(pieces)
    assert reduced["messages"][1]["content"] == "\n\n".join([notes] * len(pieces))
    assert reduced["messages"][0]["content"] == f"{STYLES['bullets']} Use at most 60 words."
    assert reduced["max_tokens"] == answer_tokens
    # Notes sized so that, joined, they fit one request.
    notes_tokens = max(MIN_NOTES, min(answer_tokens * 2, int(0.8 * budget / len(pieces))))
    assert all(r["messages"][0]["content"].startswith(NOTES) for r in mapped)
    assert {r["max_tokens"] for r in mapped} == {notes_tokens}


def test_a_short_text_is_summarized_directly(client: Client) -> None:
    summary = summarize(client, long_text(300), style="one-line", max_words=25)
    assert (summary.path, summary.chunks, summary.levels) == ("direct", 1, 0)
    assert 0 < summary.words <= 25


def test_sentiment(client: Client) -> None:
    result = sentiment(client, "I love this product, thank you so much!")
    assert result.label in ("positive", "neutral", "negative")
    assert result.score is not None and -1.0 <= result.score <= 1.0
    per_sentence = sentiment_by_sentence(client, "The food was wonderful. 店員の態度は最悪でした。")
    assert [r.text for r in per_sentence] == ["The food was wonderful.", "店員の態度は最悪でした。"]


def test_bad_arguments(client: Client) -> None:
    with pytest.raises(SkillError, match="unknown style"):
        summarize(client, "text", style="haiku")
    with pytest.raises(SkillError, match="empty"):
        summarize(client, "  ")
    with pytest.raises(SkillError, match="leaves no room"):
        summarize(client, "text", context_tokens=300)


def test_text_helpers() -> None:
    assert sentences("Hello there. How are you? 元気です。ありがとう！") == [
        "Hello there.",
        "How are you?",
        "元気です。",
        "ありがとう！",
    ]
    assert word_count("Two words") == 2
    assert word_count("日本語です") == 5
    assert truncate_words("One two three. Four five six.", 4) == "One two three."
    assert truncate_words("One two three four five", 2) == "One two"
    pieces = split(long_text(2000), budget=500)
    assert len(pieces) >= 4 and all(estimate_tokens(p) <= 500 for p in pieces)


def test_split_keeps_a_huge_mixed_script_sentence_within_the_budget() -> None:
    """One "sentence" with no punctuation, Japanese then ASCII, far longer than the window:
    every piece fits the budget (a cut by the average characters per token did not)."""
    text = "句読点のない長い日本語" * 300 + "no punctuation at all " * 1500
    pieces = split(text, 500)
    assert len(pieces) > 5 and all(estimate_tokens(p) <= 500 for p in pieces)
    assert "".join(pieces) == text.strip()


def test_split_keeps_the_text_in_order_around_a_huge_sentence() -> None:
    text = "A short opening paragraph.\n\n" + "word " * 3000
    pieces = split(text, 500)
    assert pieces[0] == "A short opening paragraph."  # not after the huge sentence's runs
    assert "".join(pieces[1:]) == ("word " * 3000).strip()


def test_a_looping_summary_is_cut_where_it_repeats() -> None:
    looped = "Q3 2026: Q3 2026: Q3 2026: Q3 2026: Q3 2026:"
    assert has_loop(looped) and not has_loop("Sales rose. Costs fell in the second quarter.")
    assert cut_loop("Sales rose in May. The team met the plan and the team met the plan.") == (
        "Sales rose in May."
    )
    # Nothing left of a loop that starts at once: the source's key sentences instead.
    source = "Revenue rose 12 percent in Q3 2026. The Osaka office opened in May. Costs fell."
    text, fallback, _ = checked_summary(looped, source, "one-line", 25)
    assert fallback and text in sentences(source)


def test_a_sentence_with_a_number_not_in_the_source_is_dropped() -> None:
    source = "Revenue rose 12 percent to 1,200 million yen. The Osaka office opened in May."
    generated = "Revenue rose 12 percent to 1200 million yen. Profit rose 45 percent."
    text, fallback, dropped = checked_summary(generated, source, "paragraph", 60)
    assert not fallback and text == "Revenue rose 12 percent to 1200 million yen."
    assert dropped == ["Profit rose 45 percent."]


def test_bullets_run_together_are_split_and_a_refusal_falls_back() -> None:
    source = "The plan was approved. The budget grows next year. Hiring starts in April."
    text, fallback, _ = checked_summary(
        "- The plan was approved. - The budget grows.", source, "bullets", 60
    )
    assert not fallback and text == "- The plan was approved.\n- The budget grows."
    text, fallback, _ = checked_summary(
        "I'm sorry, but I'm unable to assist with that.", source, "bullets", 60
    )
    assert fallback and all(line.startswith("- ") for line in text.splitlines())


def test_key_sentences_are_the_sources_own_within_the_length() -> None:
    text = long_text(600) + "\n\n売上は前年より増えました。大阪の新しい事務所が開きました。"
    picked = key_sentences(text, 40)
    assert picked and sum(word_count(s) for s in picked) <= 40
    assert all(s in sentences(text) for s in picked)


@pytest.mark.parametrize("style", ["bullets", "one-line"])
def test_the_default_model_summary_is_checked(client: Client, style: str) -> None:
    """The README's case: the default model's summary in each style, with no loop and no
    number the source does not hold (a generated one, or the extractive fallback)."""
    source = long_text(300)
    summary = summarize(client, source, style=style, max_words=40)
    assert 0 < summary.words <= 40 and not has_loop(summary.text)
    assert all(n in numbers(source) for n in numbers(summary.text))
    if style == "bullets":
        assert all(line.startswith("- ") for line in summary.text.splitlines())
    else:
        assert "\n" not in summary.text
