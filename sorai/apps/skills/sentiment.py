"""sentiment: positive / neutral / negative with a score, per text or per sentence.

A classification over three described labels (see classify); the score is
P(positive) - P(negative), in [-1, 1], from the same label probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sorai.apps.client import Client
from sorai.apps.skills.base import SkillError
from sorai.apps.skills.classify import classify
from sorai.apps.text import sentences

LABELS = {
    "positive": "the writer is pleased, thankful, satisfied or enthusiastic",
    "neutral": "facts, questions or requests without feeling either way",
    "negative": "the writer is unhappy, angry, disappointed or worried",
}
INSTRUCTION = "Classify the sentiment the writer expresses in the text."


@dataclass
class Sentiment:
    text: str
    label: str  # positive, neutral or negative
    score: float | None  # P(positive) - P(negative); None without log-probabilities
    probabilities: dict[str, float] = field(default_factory=dict)


def sentiment(client: Client, text: str) -> Sentiment:
    result = classify(client, text, LABELS, instruction=INSTRUCTION)
    p = result.scores
    score = p["positive"] - p["negative"] if p else None
    return Sentiment(text, result.label, score, p)


def sentiment_by_sentence(client: Client, text: str) -> list[Sentiment]:
    found = sentences(text)
    if not found:
        raise SkillError("nothing to score: the text is empty")
    return [sentiment(client, sentence) for sentence in found]
