"""topics: many short texts (tickets, calls) -> clusters of their embeddings -> a short label,
a count and the members of each: the seed's "pattern recognition".

Embeddings come from the endpoint (`/v1/embeddings`); clustering is k-means (k-means++ seeding,
cosine on normalised vectors). Without k, k is chosen by the mean silhouette over 2..max_topics.
Each cluster is labelled by the chat model from the members nearest its centre, under a JSON
schema so the label is always a string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sorai.apps.client import Client
from sorai.apps.skills.base import SkillError, checked

LABEL_PROMPT = (
    "These texts belong to one group. Give the group a short label of 2 to 5 words naming "
    'what they have in common. Answer with JSON: {"label": "..."}.'
)
SILHOUETTE_SAMPLE = 2000  # points the silhouette is measured on (it is quadratic)


@dataclass
class Topic:
    label: str
    count: int
    members: list[int]  # indices into the texts, nearest the centre first
    examples: list[str] = field(default_factory=list)


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
            "label": {"type": "string", "minLength": 1, "maxLength": 60, "pattern": LABEL_PATTERN}
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
    return " ".join(str(answer["label"]).split()) or "(unlabelled)"


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
    found = []
    for c in range(k):
        members = np.flatnonzero(assign == c)
        if len(members) == 0:
            continue
        centre = vectors[members].mean(axis=0)
        order = members[np.argsort(-(vectors[members] @ centre))]
        examples = [texts[i] for i in order[:8]]
        found.append(Topic(_label(client, examples), len(order), order.tolist(), examples[:3]))
    return sorted(found, key=lambda t: -t.count)
