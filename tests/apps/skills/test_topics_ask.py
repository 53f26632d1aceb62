"""topics and ask with the real embedding model (all-MiniLM-L6-v2 behind /v1/embeddings) and
the embedded default chat model, both served in this process."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from sorai.apps.client import Client
from sorai.apps.rag import Index, add_files, search
from sorai.apps.rag.chunk import Chunk
from sorai.apps.skills.ask import (
    DONT_KNOW,
    MAX_ANSWER,
    NOT_IN_PASSAGES,
    ask,
    best_sentence,
    complete_sentences,
    retrieve,
)
from sorai.apps.skills.base import SkillError
from sorai.apps.skills.keywords import class_keywords, terms
from sorai.apps.skills.topics import is_name, topics

GROUPS = {
    "billing": [
        "I was charged twice for my subscription this month.",
        "Please refund the duplicate payment on my credit card.",
        "My invoice shows the wrong amount.",
        "Why did my bill go up without notice?",
    ],
    "login": [
        "I forgot my password and cannot log in.",
        "The password reset email never arrives.",
        "My account is locked after too many login attempts.",
        "Two-factor authentication code is not accepted when I sign in.",
    ],
    "shipping": [
        "My package has not been delivered yet.",
        "The tracking number shows no updates for a week.",
        "The parcel arrived damaged and the box was crushed.",
        "Can I change the delivery address of my order?",
    ],
}


def test_topics_group_the_tickets(client: Client) -> None:
    texts = [t for group in GROUPS.values() for t in group]
    group_of = {t: name for name, group in GROUPS.items() for t in group}
    found = topics(client, texts, k=3)
    assert sum(t.count for t in found) == len(texts)
    assert sorted(i for t in found for i in t.members) == list(range(len(texts)))
    for topic in found:
        assert isinstance(topic.label, str) and topic.label
        assert topic.count == len(topic.members) and 1 <= len(topic.examples) <= 3
    # Each cluster is mostly one group: 10 of the 12 tickets at least sit with their group.
    agree = sum(max(sum(group_of[texts[i]] == g for i in t.members) for g in GROUPS) for t in found)
    assert agree >= 10
    for topic in found:  # keywords always; the model's name only when it passes the checks
        assert topic.keywords and (topic.named or topic.label == ", ".join(topic.keywords))
        assert not topic.named or is_name(topic.label, [texts[i] for i in topic.members])
    chosen = topics(client, texts)  # k by silhouette
    assert 2 <= len(chosen) <= 8
    with pytest.raises(SkillError, match="at least two texts"):
        topics(client, ["one"])


@pytest.fixture(scope="module")
def index(client: Client, tmp_path_factory) -> Index:
    docs = tmp_path_factory.mktemp("docs")
    (docs / "warranty.md").write_text(
        "# Warranty\n\nThe ABC blender comes with a warranty of 90 days from the date of "
        "purchase. The warranty covers the motor and the jar.\n"
    )
    (docs / "shipping.txt").write_text(
        "Orders ship within two business days. Delivery takes three to five days.\n"
    )
    (docs / "hours.txt").write_text(
        "店舗の営業時間は午前10時から午後8時までです。定休日は毎週水曜日です。\n"
    )
    index = Index(tmp_path_factory.mktemp("index") / "docs.sqlite")
    report = add_files(index, [docs], client)
    assert report.failures == [] and report.chunks >= 3
    return index


def test_ask_cites_the_chunk_with_the_answer(client: Client, index: Index) -> None:
    answer = ask(client, "How long is the warranty of the ABC blender?", index, k=3)
    assert answer.citations
    assert any("90 days" in c.text for c in answer.citations)
    assert all(c.number >= 1 and Path(c.path).name for c in answer.citations)


def test_ask_s_found_agrees_with_the_answer_on_the_default_model(
    client: Client, index: Index
) -> None:
    # Before, found was False next to a right answer (the model's flag, then the model's
    # answer not backed): the passage holds the answer, so found is True, and the answer is
    # the model's when the passage backs it, else the passage's own sentence.
    answer = ask(client, "How long is the warranty of the ABC blender?", index, k=3)
    assert answer.found and "90" in answer.text
    assert any("90 days" in c.text for c in answer.citations)


# Questions written for the fixture index above, labelled by hand: whether its documents hold
# the answer. The three without it share words with the documents ("the ABC blender").
_QUESTIONS = [
    ("How long is the warranty of the ABC blender?", True),
    ("What does the blender's warranty cover?", True),
    ("How many days does delivery take?", True),
    ("When do orders ship?", True),
    ("How fast are orders shipped?", True),
    ("店舗の営業時間は何時から何時までですか？", True),
    ("定休日は何曜日ですか？", True),
    ("What colour is the ABC blender?", False),
    ("Which volcano erupted on Io in 1979?", False),
    ("Who founded the company that makes the blender?", False),
    ("How much does express shipping to Canada cost?", False),
    ("駐車場は何台分ありますか？", False),
]


def test_found_agrees_with_the_presence_of_the_answer(client: Client, index: Index) -> None:
    """found is decided from the passages before any model is asked, so it is measured here
    with the real encoder alone (the chat model only words the answer)."""
    agree = [bool(retrieve(client, q, index, k=3)[1]) == present for q, present in _QUESTIONS]
    missed = [q for (q, _), ok in zip(_QUESTIONS, agree, strict=True) if not ok]
    assert sum(agree) >= 0.9 * len(_QUESTIONS), missed


def test_ask_says_it_does_not_know(client: Client, index: Index) -> None:
    answer = ask(client, "Which volcano erupted on Io in 1979?", index)
    assert answer.text == DONT_KNOW and not answer.citations and not answer.found


def test_ask_embeds_the_question_once(client: Client, index: Index, monkeypatch) -> None:
    """The search and the relevance check share one embeddings request."""
    asked: list[list[str]] = []
    embed = client.embed

    def counted(texts, *args, **kwargs):
        asked.append(list(texts))
        return embed(texts, *args, **kwargs)

    monkeypatch.setattr(client, "embed", counted)
    ask(client, "Which volcano erupted on Io in 1979?", index, mode="hybrid")
    assert asked == [["Which volcano erupted on Io in 1979?"]]


def test_japanese_keyword_search_finds_the_japanese_chunk(client: Client, index: Index) -> None:
    hits = search(index, "営業時間", client, mode="keyword")
    assert hits and "営業時間" in hits[0].text


@pytest.mark.slow  # the default model's Japanese answer runs to its length bound: ~25 s
def test_japanese_question_cites_the_japanese_chunk(client: Client, index: Index) -> None:
    answer = ask(client, "店舗の営業時間は何時から何時までですか？", index, k=3)
    assert answer.model_found is not None  # the chunk was relevant: the model was asked
    if answer.found:
        assert any("営業時間" in c.text for c in answer.citations)
    else:  # the 135M model echoes the question ("何時から何時までですが？"): no hours in it
        assert answer.text == NOT_IN_PASSAGES and not answer.citations


class _FixedEndpointDouble:
    """Test double for an endpoint: every text embeds to the same vector (as identical texts
    do), every topic is named "same" (a name the texts do not bear out: keywords label them)."""

    def embed(self, texts):
        return [[0.6, 0.8, 0.0] for _ in texts]

    def chat_json(self, messages, schema, **kwargs):
        return {"label": "same"}


@pytest.mark.parametrize("count", [2, 3, 9])
def test_identical_texts_are_one_topic(count: int) -> None:
    found = topics(_FixedEndpointDouble(), ["Where is my parcel?"] * count)  # type: ignore[arg-type]
    assert [(t.label, t.count, sorted(t.members)) for t in found] == [
        ("parcel", count, list(range(count)))
    ]


class _AskEndpointDouble:
    """Test double for an endpoint: the question embeds to `question_vector`; the chat answers
    `reply` and keeps the prompt it was given."""

    embedding_model = "double"

    def __init__(self, question_vector: list[float], reply: dict) -> None:
        self.question_vector, self.reply, self.prompt = question_vector, reply, ""

    def embed(self, texts):
        return [self.question_vector for _ in texts]

    def chat_json(self, messages, schema, **kwargs):
        self.prompt = messages[-1]["content"]
        return self.reply


@pytest.fixture
def three_chunks(tmp_path: Path) -> Index:
    """Chunks on three axes: the motor's price, a text that shares only "the" with the
    question, and one on another subject."""
    index = Index(tmp_path / "three.sqlite")
    for n, text in enumerate(["Motor price: 50 dollars.", "Who wrote the manual?", "Ships fast."]):
        chunk = Chunk(0, text, 0, len(text), None, None)
        vector = [float(axis == n) for axis in range(3)]
        index.put_document(
            f"/docs/{n}.txt", sha256=str(n), mtime=0.0, chunks=[chunk], vectors=[vector],
            embedding_model="double",
        )  # fmt: skip
    return index


def test_ask_takes_keyword_hits_near_the_question_but_not_far_off_ones(three_chunks) -> None:
    # cosine 0.3 to the motor chunk (and its keyword), 0.05 to the "the" one, 0.95 to the last
    endpoint = _AskEndpointDouble(
        [0.3, 0.05, math.sqrt(1 - 0.3**2 - 0.05**2)],
        {"answer": "$50", "passages": [1], "found": True},
    )
    answer = ask(endpoint, "what is the motor price?", three_chunks)  # type: ignore[arg-type]
    assert "Motor price" in endpoint.prompt and "Ships fast" in endpoint.prompt
    assert "Who wrote" not in endpoint.prompt
    assert answer.found and answer.text == "$50" and len(answer.citations) == 1


def test_a_hit_removed_since_the_search_is_not_relevant(three_chunks, monkeypatch) -> None:
    """Another process removed a chunk between the search and the similarity lookup."""
    from sorai.apps.skills import ask as module

    real = search(three_chunks, "motor", mode="keyword")[0]
    gone = dataclasses.replace(real, chunk_id=999)
    monkeypatch.setattr(module, "search", lambda *args, **kwargs: [gone, real])
    endpoint = _AskEndpointDouble(
        [1.0, 0.0, 0.0], {"answer": "$50", "passages": [1], "found": True}
    )
    answer = ask(endpoint, "motor price?", three_chunks)  # type: ignore[arg-type]
    assert [c.chunk_id for c in answer.citations] == [real.chunk_id]


def test_answers_that_ignore_the_schema_are_clear_errors(three_chunks) -> None:
    """An endpoint that ignores response_format sends other JSON: a SkillError naming what
    does not fit, not a KeyError."""
    endpoint = _AskEndpointDouble([1.0, 0.0, 0.0], {"answer": "$50"})
    with pytest.raises(SkillError, match="answer does not fit .*'passages' is a required"):
        ask(endpoint, "motor price?", three_chunks)  # type: ignore[arg-type]
    labeller = _FixedEndpointDouble()
    labeller.chat_json = lambda messages, schema, **kwargs: ["billing"]
    with pytest.raises(SkillError, match="topic label does not fit"):
        topics(labeller, ["a", "b"])  # type: ignore[arg-type]


def test_max_topics_is_a_ceiling() -> None:
    """--max-topics 1 is one topic (the choice of k started at 2 whatever the ceiling)."""
    endpoint = _FixedEndpointDouble()
    endpoint.embed = lambda texts: [[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]]
    found = topics(endpoint, ["a", "b", "c", "d"], max_topics=1)  # type: ignore[arg-type]
    assert [(t.count, sorted(t.members)) for t in found] == [(4, [0, 1, 2, 3])]
    assert len(topics(endpoint, ["a", "b", "c", "d"], max_topics=2)) == 2  # type: ignore[arg-type]
    with pytest.raises(SkillError, match="max_topics must be at least 1"):
        topics(endpoint, ["a", "b"], max_topics=0)  # type: ignore[arg-type]


def test_the_label_and_answer_schemas_leave_no_room_for_templates_or_blanks(three_chunks) -> None:
    """What the schemas say is what guided decoding holds a small model to, and what an
    endpoint that ignores them is checked against: a topic label is one line without braces,
    an answer is not empty."""
    labeller = _FixedEndpointDouble()
    sent = []

    def template_label(messages, schema, **kwargs):
        sent.append(schema)
        return {"label": "{{topic}}\n- billing"}

    labeller.chat_json = template_label
    with pytest.raises(SkillError, match="topic label does not fit"):
        topics(labeller, ["a", "b"])  # type: ignore[arg-type]
    label = sent[0]["properties"]["label"]
    assert label["minLength"] == 1 and label["maxLength"] == 60 and "pattern" in label
    endpoint = _AskEndpointDouble([1.0, 0.0, 0.0], {"answer": "", "passages": [1], "found": True})
    with pytest.raises(SkillError, match="answer does not fit"):
        ask(endpoint, "motor price?", three_chunks)  # type: ignore[arg-type]


def test_a_refusal_or_sentence_is_not_a_topic_name() -> None:
    members = GROUPS["billing"]
    assert is_name("Billing and refunds", members)
    assert is_name("Duplicate payment", members)
    for bad in [
        "I'm sorry for any inconvenience, but I'm unable to assist by",
        "",
        "These texts are about billing.",
        "Space travel",  # not what the members say
        "Customer complaints about charges, refunds, invoices and bills going up",
        # A run-on cut at the schema's 60 characters, though short in words.
        "Refunds of duplicate-payment-charges-on-credit-card-invoices-and-bills"[:60],
    ]:
        assert not is_name(bad, members), bad


def test_a_refused_name_gives_way_to_the_keywords() -> None:
    endpoint = _FixedEndpointDouble()
    endpoint.embed = lambda texts: [[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4
    endpoint.chat_json = lambda messages, schema, **kwargs: {
        "label": "I'm sorry, but I'm unable to assist"
    }
    texts = GROUPS["billing"] + GROUPS["login"]
    found = topics(endpoint, texts, k=2)  # type: ignore[arg-type]
    assert all(not t.named and t.label == ", ".join(t.keywords) for t in found)
    assert any("password" in t.keywords for t in found)


def test_japanese_keywords_are_character_bigrams_without_particles() -> None:
    assert "ログ" in terms("パスワードを忘れてログインできません")
    assert not any("を" in t or "で" in t for t in terms("パスワードを忘れてログインできません"))
    keywords = class_keywords(
        [
            ["請求書の金額が間違っています", "請求が二重です"],
            ["荷物がまだ届きません", "荷物の追跡番号"],
        ]
    )
    assert keywords[0][0] == "請求" and keywords[1][0] == "荷物"


@pytest.mark.parametrize(
    ("reply", "text", "cited"),
    [
        # The model's flag is not what decides: a backed answer flagged false is found ...
        ({"answer": "The motor costs 50 dollars.", "passages": [1], "found": False},
         "The motor costs 50 dollars.", [1]),
        # ... and an answer the passages do not back gives way to their own sentence: the
        # passage holds the answer, so it is found all the same.
        ({"answer": "The motor costs 80 dollars.", "passages": [1], "found": True},
         "Motor price: 50 dollars.", [1]),
        ({"answer": "I don't know.", "passages": [1], "found": True},
         "Motor price: 50 dollars.", [1]),
        ({"answer": "Yes.", "passages": [1], "found": True}, "Motor price: 50 dollars.", [1]),
        # The citation is the passage that backs the answer, not the one the model named.
        ({"answer": "The motor price is 50 dollars.", "passages": [2], "found": True},
         "The motor price is 50 dollars.", [1]),
    ],
)  # fmt: skip
def test_found_and_citations_come_from_the_evidence(three_chunks, reply, text, cited) -> None:
    endpoint = _AskEndpointDouble([0.8, 0.0, 0.6], reply)
    answer = ask(endpoint, "What is the motor price?", three_chunks)  # type: ignore[arg-type]
    assert answer.found and answer.model_found is reply["found"]
    assert answer.text == text and answer.extractive is (text != reply["answer"])
    assert [c.number for c in answer.citations] == cited


def test_the_passages_sentence_is_the_one_about_the_question_not_a_heading() -> None:
    """Seen on the README's ask example ("How often are the keys rotated?"): the answer was
    the heading "## Rotating the keys", which holds the question's terms and nothing else."""
    keys = (
        "## Rotating the keys\n\nTo rotate the API keys, add the new key to `keys.txt`, restart "
        "the server, then delete the old key. Rotate the keys every 90 days."
    )
    question = "How often are the keys rotated?"
    assert best_sentence(question, {2: keys}) == ("Rotate the keys every 90 days.", 2)
    assert best_sentence("What is the motor price?", {1: "Motor price: 50 dollars."}) == (
        "Motor price: 50 dollars.",
        1,
    )


def test_without_a_passage_holding_the_question_the_model_is_not_asked(three_chunks) -> None:
    """Relevant passages (cosine 0.58 each) that hold none of the question's key terms: not
    found, and no answer to generate."""
    endpoint = _AskEndpointDouble([0.58, 0.58, 0.57], {"answer": "unused"})
    endpoint.chat_json = None  # called, it would raise TypeError
    answer = ask(endpoint, "Who designed the gearbox?", three_chunks)  # type: ignore[arg-type]
    assert (answer.text, answer.found, answer.citations) == (NOT_IN_PASSAGES, False, [])


def test_an_answer_cut_by_the_budget_ends_at_its_last_full_sentence() -> None:
    assert complete_sentences("It lasts 90 days. Call the shop at") == "It lasts 90 days."
    assert complete_sentences("$50") == "$50"
    assert complete_sentences("保証は90日です。修理は") == "保証は90日です。"
    # A sentence end inside `code` is not one: the answer is not cut mid-command.
    run = "Rotate them with `sorai keys rotate --file k.txt. Then"
    assert complete_sentences("Keys expire. " + run) == "Keys expire."
    # An answer that fills the budget without any sentence end was cut in its only sentence.
    assert complete_sentences("x" * MAX_ANSWER) == ""
