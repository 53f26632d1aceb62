"""topics: many short texts (tickets, calls) -> clusters of their embeddings -> a short label,
a count and the members of each: the seed's "pattern recognition".

Embeddings come from the endpoint (`/v1/embeddings`); clustering is k-means (k-means++ seeding,
cosine on normalised vectors). Without k, k is chosen by the mean silhouette over 2..max_topics.
Each cluster gets keywords (class-based TF-IDF, CJK-aware: keywords.py) always, and a name
from the chat model (from the members nearest its centre, under a JSON schema) only when the
name passes checks: short, a noun phrase rather than a sentence, not a refusal, and made of
words the members use; else the keywords are the label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sorai.apps.client import Client
from sorai.apps.skills.base import SkillError, checked
from sorai.apps.skills.keywords import class_keywords, terms
from sorai.apps.skills.summary_checks import is_refusal
from sorai.apps.text import word_count

LABEL_PROMPT = (
    "These texts belong to one group. Give the group a short label of 2 to 5 words naming "
    'what they have in common. Answer with JSON: {"label": "..."}.'
)
MAX_NAME_WORDS = 6  # a CJK character counts as a word: twelve would be a sentence
MAX_NAME_CJK = 12
MAX_NAME_CHARS = 60  # the schema's maxLength
# Words that make a name a sentence or a reply to the user rather than a noun phrase.
NOT_A_NAME = frozenset(
    [
        "i",
        "i'm",
        "me",
        "my",
        "you",
        "your",
        "we",
        "our",
        "is",
        "are",
        "was",
        "were",
        "be",
        "sorry",
        "unable",
        "cannot",
        "can't",
        "please",
        "here",
        "label",
        "group",
        "these",
        "this",
        "that",
        "texts",
    ]
)
SILHOUETTE_SAMPLE = 2000  # points the silhouette is measured on (it is quadratic)


@dataclass
class Topic:
    label: str
    count: int
    members: list[int]  # indices into the texts, nearest the centre first
    examples: list[str] = field(default_factory=list)
    keywords: list[str] = field(default_factory=list)  # c-TF-IDF terms, most telling first
    named: bool = False  # the label is the model's name (it passed the checks), else keywords


def kmeans(vectors: np.ndarray, k: int, seed: int = 0, restarts: int = 8) -> np.ndarray:
    """Cluster assignments of the rows of `vectors` (unit length) into k clusters: the best
    (highest total similarity to the centres) of `restarts` k-means++ runs."""
    best, best_fit = None, -np.inf
    for run in range(restarts):
        assign, fit = _kmeans_once(vectors, k, seed * 1000 + run)
        if fit > best_fit:
            best, best_fit = assign, fit
    return best


def _kmeans_once(
    vectors: np.ndarray, k: int, seed: int, iterations: int = 50
) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(seed)
    n = len(vectors)
    centres = [vectors[rng.integers(n)]]
    for _ in range(1, k):  # k-means++: far points are likelier next centres
        distance = np.min(1.0 - vectors @ np.stack(centres).T, axis=1).clip(min=0)
        total = distance.sum()
        index = rng.choice(n, p=distance / total) if total > 0 else rng.integers(n)
        centres.append(vectors[index])
    centre = np.stack(centres)
    assign = np.zeros(n, dtype=np.int64)
    for step in range(iterations):
        new = np.argmax(vectors @ centre.T, axis=1)
        if step and np.array_equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = vectors[assign == c]
            if len(members):
                mean = members.mean(axis=0)
                centre[c] = mean / (np.linalg.norm(mean) or 1.0)
    fit = float((vectors @ centre.T)[np.arange(n), assign].sum())
    return assign, fit


def silhouette(vectors: np.ndarray, assign: np.ndarray, seed: int = 0) -> float:
    """The mean silhouette (cosine distance) of a clustering, on a sample of the points; 0
    when all the points are in one cluster."""
    n = len(vectors)
    rows = np.arange(n)
    if n > SILHOUETTE_SAMPLE:
        rows = np.random.default_rng(seed).choice(n, SILHOUETTE_SAMPLE, replace=False)
    labels = np.unique(assign)
    if len(labels) < 2:  # undefined for one cluster (identical texts end up there): no merit
        return 0.0
    distance = 1.0 - vectors[rows] @ vectors.T
    scores = []
    for i, row in enumerate(rows):
        own = assign[row]
        same = assign == own
        if same.sum() <= 1:
            scores.append(0.0)
            continue
        a = distance[i, same].sum() / (same.sum() - 1)
        b = min(distance[i, assign == other].mean() for other in labels if other != own)
        scores.append((b - a) / max(a, b) if max(a, b) > 0 else 0.0)
    return float(np.mean(scores))


LABEL_PATTERN = r"^[^\n\r{}]+$"


def _label(client: Client, examples: list[str]) -> str:
    schema = {
        "type": "object",
        # One line of text: no newline to start a list on, no braces for a template.
        "properties": {
            "label": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_NAME_CHARS,
                "pattern": LABEL_PATTERN,
            }
        },
        "required": ["label"],
        "additionalProperties": False,
    }
    listing = "\n".join(f"- {text}" for text in examples)
    answer = checked(
        client.chat_json(
            [{"role": "system", "content": LABEL_PROMPT}, {"role": "user", "content": listing}],
            schema,
            name="topic",
            temperature=0,
            max_tokens=40,
        ),
        schema,
        "topic label",
    )
    return " ".join(str(answer["label"]).split())


def is_name(label: str, members: Sequence[str]) -> bool:
    """Whether the model's `label` for a cluster of `members` is fit to show: not empty, short
    (MAX_NAME_WORDS words, MAX_NAME_CJK CJK characters), not a sentence (no closing
    punctuation, no pronoun or verb of a reply), not a refusal, and sharing a term with the
    members (a name about something else is not theirs)."""
    label = label.strip()
    words = label.lower().replace("’", "'").split()
    cjk = sum(1 for ch in label if "\u3040" <= ch <= "\u9fff")
    # A name as long as the schema allows was cut there ("... outperforms state-of-the-art
    # syntactic-t"): a sentence run on, not a name.
    if not label or len(label) >= MAX_NAME_CHARS or is_refusal(label) or label[-1] in ".!?。！？:":
        return False
    if (cjk and cjk > MAX_NAME_CJK) or (not cjk and word_count(label) > MAX_NAME_WORDS):
        return False
    if any(w.strip(",;:\"'") in NOT_A_NAME for w in words):
        return False
    mine = set(terms(label))
    theirs = {t for text in members for t in terms(text)}
    # Word stems: "refund" names "refunds", "billing" names "billed".
    stems = {t[:5] for t in theirs}
    return bool(mine & theirs or {t[:5] for t in mine if len(t) >= 4} & stems)


def topics(
    client: Client,
    texts: Sequence[str],
    k: int | None = None,
    max_topics: int = 8,
    seed: int = 0,
) -> list[Topic]:
    """The topics of `texts`, largest first; k clusters, or the best k in 2..max_topics."""
    texts = [t for t in texts]
    if len(texts) < 2:
        raise SkillError("topics needs at least two texts")
    if any(not isinstance(t, str) or not t.strip() for t in texts):
        raise SkillError("topics: every text must be a non-empty string")
    if k is not None and not 1 <= k <= len(texts):
        raise SkillError(f"k must be between 1 and the number of texts ({len(texts)}), got {k}")
    vectors = np.asarray(client.embed(texts), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
    if max_topics < 1:
        raise SkillError(f"max_topics must be at least 1, got {max_topics}")
    if k is None and max_topics == 1:
        k = 1
    if k is None:
        candidates = range(2, max(2, min(max_topics, len(texts) - 1)) + 1)
        scored = [(silhouette(vectors, kmeans(vectors, c, seed), seed), c) for c in candidates]
        k = max(scored)[1]
    assign = kmeans(vectors, k, seed)
    orders = []
    for c in range(k):
        members = np.flatnonzero(assign == c)
        if len(members):
            centre = vectors[members].mean(axis=0)
            orders.append(members[np.argsort(-(vectors[members] @ centre))])
    keywords = class_keywords([[texts[i] for i in order] for order in orders])
    found = []
    for order, words in zip(orders, keywords, strict=True):
        examples = [texts[i] for i in order[:8]]
        name = _label(client, examples)
        named = is_name(name, [texts[i] for i in order])
        label = name if named else ", ".join(words) or short_text(examples[0])
        found.append(Topic(label, len(order), order.tolist(), examples[:3], words, named))
    return sorted(found, key=lambda t: -t.count)


def short_text(text: str, limit: int = 40) -> str:
    """The first `limit` characters of a text, for a cluster with no telling term."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
