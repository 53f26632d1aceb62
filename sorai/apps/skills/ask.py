"""ask: question answering over a `sorai index`, with citations of the chunks used.

The question is searched (hybrid by default); the passages that are relevant (a vector
similarity of at least MIN_SIMILARITY, or a keyword match at least MIN_KEYWORD_SIMILARITY) are
numbered and given to the chat model, whose answer is decoded under a JSON schema. Whether
the answer was found is decided from the evidence, not from the model's own flag (a small model
sets it at random): the best passage must cover the question's content words and the answer's
claims must be backed by the passages (their numbers and words, as the claim judge checks).
The citations are the passages that back the answer; an answer cut by the budget ends at its
last complete sentence. When no passage is relevant the model is not asked at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from sorai.apps.client import Client
from sorai.apps.eval.verdicts import content_words, evidence_support, numbers
from sorai.apps.rag import Index, search
from sorai.apps.skills.base import SkillError, checked

MIN_SIMILARITY = 0.35  # cosine of all-MiniLM-L6-v2 below which a passage is off topic
# ... unless it matches the question's words: then only below this one ("what does the motor
# cost?" is 0.33 from the passage on the motor, "who wrote the novel?" 0.02 from one that
# merely has a "the").
MIN_KEYWORD_SIMILARITY = 0.15
MAX_ANSWER = 400  # characters
DONT_KNOW = "I don't know: no passage in the index is relevant to the question."
NOT_IN_PASSAGES = "I don't know: the passages found do not hold the answer."
# found: the best passage holds at least this share of the question's content words (a
# passage on another subject shares a few of them, often half) ...
MIN_QUESTION_COVERAGE = 0.75
# ... and the answer's claims are backed by the passages at least this much (0-1).
MIN_ANSWER_SUPPORT = 0.5
MIN_CITATION_SUPPORT = 0.5  # a passage is cited when it backs this much of the answer
_DONT_KNOW = re.compile(
    r"\b(?:don'?t|do not|cannot|can't) (?:know|say|tell|find)|\bno information\b|"
    r"\b(?:does|do) not (?:contain|mention|say|state)|わかりません|分かりません",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|[。！？]")
INSTRUCTION = (
    "Answer the question using only the numbered passages. Say which passages you used. If "
    "the passages do not contain the answer, set found to false and say you don't know."
)


@dataclass
class Citation:
    number: int
    chunk_id: int
    path: str
    page: int | None
    heading: str | None
    text: str


@dataclass
class Answer:
    text: str
    citations: list[Citation] = field(default_factory=list)
    found: bool = False
    model_found: bool | None = None  # the model's own flag, for comparison only


def _relevant(client: Client, question: str, index: Index, k: int, mode: str) -> list:
    """The hits that are on topic: similar enough to the question, or matching its words and
    not far off (a shared "the" or "what" alone does not make a passage relevant)."""
    # One embedding of the question, for the search and for the relevance check.
    query = np.asarray(client.embed([question])[0], dtype=np.float32)
    hits = search(index, question, client, k=k, mode=mode, query_vector=query)
    if not hits:
        return []
    query /= max(float(np.linalg.norm(query)), 1e-12)
    ids, matrix = index.vectors()  # ids ascending, rows normalized
    wanted = np.asarray([hit.chunk_id for hit in hits], dtype=np.int64)
    rows = np.minimum(np.searchsorted(ids, wanted), max(len(ids) - 1, 0))
    found = ids[rows] == wanted if len(ids) else np.zeros(len(hits), dtype=bool)
    # A chunk another process removed since the search has no vector: not relevant.
    similarity = np.where(found, matrix[rows] @ query if len(ids) else 0.0, -1.0)
    return [
        hit
        for hit, cosine in zip(hits, similarity, strict=True)
        if cosine >= MIN_SIMILARITY
        or (hit.keyword_rank is not None and cosine >= MIN_KEYWORD_SIMILARITY)
    ]


def ask(client: Client, question: str, index: Index, k: int = 5, mode: str = "hybrid") -> Answer:
    if not question.strip():
        raise SkillError("ask: the question is empty")
    passages = _relevant(client, question, index, k, mode)
    if not passages:
        return Answer(DONT_KNOW)
    numbered = "\n\n".join(
        f"[{n}] ({hit.path}{f', page {hit.page}' if hit.page else ''})\n{hit.text}"
        for n, hit in enumerate(passages, start=1)
    )
    schema = {
        "type": "object",
        "properties": {
            # Bounded, so that a model that loops still closes the JSON within max_tokens.
            "answer": {"type": "string", "minLength": 1, "maxLength": MAX_ANSWER},
            "passages": {
                "type": "array",
                "items": {"type": "integer", "enum": list(range(1, len(passages) + 1))},
                "minItems": 1,
                "maxItems": len(passages),
            },
            "found": {"type": "boolean"},
        },
        "required": ["answer", "passages", "found"],
        "additionalProperties": False,
    }
    reply = checked(
        client.chat_json(
            [
                {"role": "system", "content": INSTRUCTION},
                {"role": "user", "content": f"Passages:\n\n{numbered}\n\nQuestion: {question}"},
            ],
            schema,
            name="answer",
            temperature=0,
            # Room for MAX_ANSWER characters at up to 3 tokens each (CJK) and the JSON around.
            max_tokens=3 * MAX_ANSWER + 100,
        ),
        schema,
        "answer",
    )
    text = complete_sentences(str(reply["answer"]).strip())
    texts = [hit.text for hit in passages]
    found = answer_found(question, text, texts)
    if not found:
        return Answer(NOT_IN_PASSAGES, [], False, bool(reply["found"]))
    citations = [
        Citation(n, p.chunk_id, p.path, p.page, p.heading, p.text)
        for n, p in ((n, passages[n - 1]) for n in cited(text, texts, reply["passages"]))
    ]
    return Answer(text, citations, True, bool(reply["found"]))


def complete_sentences(text: str) -> str:
    """The answer up to its last complete sentence when the budget cut it mid-sentence (an
    answer without any sentence end is kept whole: a short answer such as "$50")."""
    if not text or _SENTENCE_END.search(text[-1:]):
        return text
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()] if ends else text


def answer_found(question: str, answer: str, passages: list[str]) -> bool:
    """Whether the passages hold the answer, from the evidence: not a "don't know", the best
    passage covering the question, and the answer's claims backed by the passages."""
    if not answer or _DONT_KNOW.search(answer):
        return False
    wanted = content_words(question)
    if wanted:
        coverage = max(len(wanted & content_words(p)) / len(wanted) for p in passages)
        if coverage < MIN_QUESTION_COVERAGE:
            return False
    # What the answer adds to the question must be in the passages: words it merely takes
    # from the question prove nothing.
    text = "\n".join(passages)
    if numbers(answer) - numbers(text):
        return False
    words = content_words(answer) - wanted
    if not words:
        return True  # "Yes.", "$50": nothing beyond the question and numbers to check
    return len(words & content_words(text)) / len(words) >= MIN_ANSWER_SUPPORT


def cited(answer: str, passages: list[str], named: list[int]) -> list[int]:
    """The numbers (1-based) of the passages that back the answer; when none does alone, the
    best of those the model named."""
    support = [evidence_support(answer, p) for p in passages]
    backing = [n for n, s in enumerate(support, start=1) if s >= MIN_CITATION_SUPPORT]
    if backing:
        return backing
    return [max(sorted(set(named)), key=lambda n: support[n - 1])]
