"""ask: question answering over a `sorai index`, with citations of the passages used.

The question is searched (hybrid by default); the passages that are relevant (a vector
similarity of at least MIN_SIMILARITY, or a keyword match at least MIN_KEYWORD_SIMILARITY) are
numbered and given to the chat model, whose answer is decoded under a JSON schema. Whether
the answer was found is decided from the evidence, not from the model's own flag (a small model
sets it at random): a relevant passage must hold half the question's key terms, or be close to
it in meaning. When none does, the model is not asked. When one does, the answer is the model's
if the passages back it (its claims pass the claim judge's evidence check, and what it adds to
the question is in the passages), else the passages' own sentence that best covers the question.
The citations are the passages that back the answer; an answer cut by the budget ends at its
last complete sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sorai.apps.client import Client
from sorai.apps.eval.verdicts import (
    coverage,
    evidence_support,
    grounded_in,
    key_terms,
    split_claims,
)
from sorai.apps.rag import Index, search
from sorai.apps.rag.search import SearchResult
from sorai.apps.skills.base import SkillError, checked
from sorai.apps.text import sentences

MIN_SIMILARITY = 0.35  # cosine of all-MiniLM-L6-v2 below which a passage is off topic
# ... unless it matches the question's words: then only below this one ("what does the motor
# cost?" is 0.33 from the passage on the motor, "who wrote the novel?" 0.02 from one that
# merely has a "the").
MIN_KEYWORD_SIMILARITY = 0.15
MAX_ANSWER = 400  # characters
DONT_KNOW = "I don't know: no passage in the index is relevant to the question."
NOT_IN_PASSAGES = "I don't know: the passages found do not hold the answer."
# found: a relevant passage (with its file name and heading) holds at least this share of the
# question's key terms, or its cosine to the question is at least MIN_FOUND_SIMILARITY (the
# same content in other words). Calibrated with benchmarks/bench_judge.py: on its labelled
# questions (cloze questions over the Python reference's topics, and the public SQuAD, DROP
# and TriviaQA samples) 0.5 agrees best with the answer's presence on both sets (92.6% and
# 95.3%); 0.75 agreed on 48 of the 64 public ones (it missed paraphrased questions), and no
# passage without the answer came closer than cosine 0.6.
MIN_QUESTION_COVERAGE = 0.5
MIN_FOUND_SIMILARITY = 0.6
# The model's answer stands when its claims are backed this much (the claim judge's evidence
# check, 0-1) and this share of what it adds to the question is in the passages.
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
    # The text is the passages' own sentence: the model's answer was not backed by them.
    extractive: bool = False


def _relevant(
    client: Client, question: str, index: Index, k: int, mode: str
) -> list[tuple[SearchResult, float]]:
    """The hits that are on topic, with their cosine to the question: similar enough to it,
    or matching its words and not far off (a shared "the" or "what" alone does not make a
    passage relevant)."""
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
        (hit, float(cosine))
        for hit, cosine in zip(hits, similarity, strict=True)
        if cosine >= MIN_SIMILARITY
        or (hit.keyword_rank is not None and cosine >= MIN_KEYWORD_SIMILARITY)
    ]


def evidence(hit: SearchResult) -> str:
    """A passage as evidence: its text under its heading and its file's name (a file named
    for its subject says what the passage is about, as a heading does)."""
    return "\n".join(filter(None, [Path(hit.path).stem, hit.heading, hit.text]))


def holds_answer(question: str, passage: str, cosine: float) -> bool:
    """Whether a passage holds the answer to the question, from the evidence: half the
    question's key terms in it, or a cosine that only the same content in other words
    reaches."""
    return coverage(question, passage) >= MIN_QUESTION_COVERAGE or cosine >= MIN_FOUND_SIMILARITY


def retrieve(
    client: Client, question: str, index: Index, k: int = 5, mode: str = "hybrid"
) -> tuple[list[SearchResult], list[int]]:
    """(the relevant passages, the numbers (1-based) of those that hold the answer): what
    ask's `found` is decided from, before any model is asked."""
    relevant = _relevant(client, question, index, k, mode)
    holding = [
        n
        for n, (hit, cosine) in enumerate(relevant, start=1)
        if holds_answer(question, evidence(hit), cosine)
    ]
    return [hit for hit, _ in relevant], holding


def ask(client: Client, question: str, index: Index, k: int = 5, mode: str = "hybrid") -> Answer:
    if not question.strip():
        raise SkillError("ask: the question is empty")
    passages, holding = retrieve(client, question, index, k, mode)
    if not passages:
        return Answer(DONT_KNOW)
    if not holding:  # no need for the model: whatever it said would not be found
        return Answer(NOT_IN_PASSAGES)
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
    if backed(question, text, texts):
        used, extractive = cited(text, texts, reply["passages"]), False
    else:
        text, number = best_sentence(question, {n: texts[n - 1] for n in holding})
        used, extractive = [number], True
    citations = [
        Citation(n, p.chunk_id, p.path, p.page, p.heading, p.text)
        for n, p in ((n, passages[n - 1]) for n in used)
    ]
    return Answer(text, citations, True, bool(reply["found"]), extractive)


def complete_sentences(text: str, budget: int = MAX_ANSWER) -> str:
    """The answer up to its last complete sentence when it ends mid-sentence (the budget or
    the model cut it); sentence ends inside `code` do not count. An answer without any
    sentence end is kept whole when shorter than the budget (a short answer such as "$50"),
    and is nothing ("") when it fills the budget: it was cut somewhere in its only sentence."""
    if not text or _SENTENCE_END.search(text[-1:]):
        return text
    ends = [m for m in _SENTENCE_END.finditer(text) if text[: m.start()].count("`") % 2 == 0]
    if ends:
        return text[: ends[-1].end()]
    return text if len(text) < budget else ""


def backed(question: str, answer: str, passages: list[str]) -> bool:
    """Whether the passages back the model's answer: not a "don't know", its claims pass the
    claim judge's evidence check against the passages (numbers, words, negation), and it adds
    something to the question that the passages hold (an echo of the question, or a bare
    "Yes", proves nothing)."""
    if not answer or _DONT_KNOW.search(answer):
        return False
    text = "\n".join(passages)
    added = key_terms(answer) - key_terms(question)
    if not added or len(added & key_terms(text)) / len(added) < MIN_ANSWER_SUPPORT:
        return False
    check = grounded_in(text)
    claims = split_claims(answer)
    return sum(check(claim) for claim in claims) / len(claims) >= MIN_ANSWER_SUPPORT


def best_sentence(question: str, passages: dict[int, str]) -> tuple[str, int]:
    """(the passages' sentence that best answers the question, the number of its passage):
    the one holding most of the question's key terms, then the one most about them (the share
    of its own terms that are the question's: "Rotate the keys every 90 days." before a long
    how-to that mentions the keys), the first in passage order on a tie. A heading, or any
    sentence that adds nothing to the question, is passed over while another is left. At most
    MAX_ANSWER characters."""
    asked = key_terms(question)
    best, number, score = "", next(iter(passages)), (-1.0, -1.0, -1.0)
    for n, text in passages.items():
        for sentence in sentences(text):
            terms = key_terms(sentence)
            adds = float(bool(terms - asked) and not sentence.startswith("#"))
            focus = len(terms & asked) / len(terms) if terms else 0.0
            value = (adds, coverage(question, sentence), focus)
            if value > score:
                best, number, score = sentence, n, value
    if len(best) > MAX_ANSWER:
        best = best[: MAX_ANSWER - 1].rsplit(" ", 1)[0] + "…"
    return " ".join(best.split()), number


def cited(answer: str, passages: list[str], named: list[int]) -> list[int]:
    """The numbers (1-based) of the passages that back the answer; when none does alone, the
    best of those the model named."""
    support = [evidence_support(answer, p) for p in passages]
    backing = [n for n, s in enumerate(support, start=1) if s >= MIN_CITATION_SUPPORT]
    if backing:
        return backing
    return [max(sorted(set(named)), key=lambda n: support[n - 1])]
