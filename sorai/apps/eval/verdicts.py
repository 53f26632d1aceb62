"""The default judge for groundedness, relevance and similarity: the response split into
claims, each given a yes/no verdict scored from evidence and the model's P(yes).

A free 1-5 answer from a small model is a guess (the 135M default scored every row 1). Here
each claim (a sentence of the response) gets a support in 0-1: the model's probability of
"yes" to the prompt's question, read from its token logprobs (`Client.choice_probabilities`),
mixed with a check of the evidence that does not depend on the model's size: the claim's
numbers must appear in the evidence (the context, the query or the ground truth), its content
words should, and a negation must not be the claim's alone (for the default model, the check
alone: its P(yes) was measured to lower the AUROC). The score is 1 + 4 x the mean support, on
the 1-5 scale of the rubric prompts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sorai import hub
from sorai.apps.eval.judge import Prompt, Verdict

MAX_CLAIMS = 12
MAX_CLAIM_CHARS = 400
# How much of a claim's support is the judge model's P(yes); the rest is the evidence check.
# Tuned with benchmarks/bench_judge.py on the default model (76 labelled rows, a random half to
# choose on, the other held out): its P(yes) ranks bad claims above grounded ones (AUROC
# 0.29-0.46 alone), and the score's AUROC does not rise with the weight (train: 0.969 at 0,
# 0.938 at 0.05-0.5, 0.761 at 0.75; held out: 1.0 up to 0.35, 0.881 at 0.75), so the default
# model's weight is 0: its verdict is the evidence check's. Other judges keep MODEL_WEIGHT
# (not tuned here: a larger model's P(yes) carries signal that the evidence check, blind to
# paraphrase, lacks).
DEFAULT_MODEL_WEIGHT = 0.0
MODEL_WEIGHT = 0.25
_SENTENCE = re.compile(r"(?<=[.!?。！？])\s+|(?<=[。！？])|\n+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")
_NEGATION = re.compile(r"\b(?:no|not|never|none|nor|cannot|without)\b|n't|ない|ません|せず")
_STOP = frozenset(
    re.findall(
        r"\w+",
        "a an the and or but if of to in on at by for with from as is are was were be been "
        "being it its this that these those there here what which who whom whose when where "
        "why how do does did has have had can could will would shall should may might must i "
        "you he she we they me him her us them my your his our their so than then too very "
        "just also about into over under up down out only own same such any all each some "
        "most more other long many much often",
    )
)


class ChoiceJudge(Protocol):
    """What the claim judge needs of `sorai.apps.client.Client`."""

    model: str

    def choice_probabilities(
        self, messages: list[dict[str, Any]], choices: list[str], **kw: Any
    ) -> dict[str, float]: ...


@dataclass
class ClaimVerdict:
    claim: str
    support: float  # 0-1
    p_yes: float  # NaN: the model was not asked (weight 0)
    evidence: float


def split_claims(text: str) -> list[str]:
    """The response's sentences (at most MAX_CLAIMS, each cut at MAX_CLAIM_CHARS); a response
    without sentence ends is one claim."""
    parts = [p.strip(" \t-*•") for p in _SENTENCE.split(text.strip())]
    claims = [p[:MAX_CLAIM_CHARS] for p in parts if _WORD.search(p) or _NUMBER.search(p)]
    return claims[:MAX_CLAIMS] or ([text.strip()[:MAX_CLAIM_CHARS]] if text.strip() else [])


def _stem(word: str) -> str:
    """A light stem: "rotated", "rotating", "rotates" and "rotate" are all "rotat", "keys"
    is "key"."""
    word = word.lower()
    for suffix in ("ing", "ed", "es"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    if len(word) > 4 and word.endswith("e"):
        return word[:-1]
    return word


def content_words(text: str) -> set[str]:
    """Stemmed words that carry meaning (stop words aside); CJK text as character pairs."""
    # Stop words go before stemming ("there" is not "ther") and after ("notes" is "not").
    found = (w.lower() for w in _WORD.findall(text) if not _CJK.search(w))
    words = {_stem(w) for w in found if w not in _STOP} - _STOP
    cjk = "".join(_CJK.findall(text))
    return words | {cjk[i : i + 2] for i in range(len(cjk) - 1)}


def numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in _NUMBER.findall(text)}


def key_terms(text: str) -> set[str]:
    """What a text is about, to look for elsewhere: its content words and its numbers."""
    return content_words(text) | numbers(text)


def coverage(text: str, evidence: str) -> float:
    """0-1: the share of the text's key terms that the evidence holds (0 when it has none)."""
    terms = key_terms(text)
    return len(terms & key_terms(evidence)) / len(terms) if terms else 0.0


def evidence_support(claim: str, evidence: str) -> float:
    """0-1: how far the evidence backs the claim's wording. A number of the claim missing
    from the evidence is a contradiction (0); otherwise the share of the claim's content words
    found in the evidence."""
    if numbers(claim) - numbers(evidence):
        return 0.0
    words = content_words(claim)
    if not words:
        return 1.0 if numbers(claim) else 0.5  # "Yes." says nothing to check
    return len(words & content_words(evidence)) / len(words)


def negated(text: str) -> bool:
    return bool(_NEGATION.search(text.lower()))


def best_evidence(claim: str, evidence: str) -> str:
    """The evidence's sentence that shares most content words with the claim (a negation
    elsewhere in a long context says nothing about this claim)."""
    sentences = [s for s in _SENTENCE.split(evidence) if s.strip()] or [evidence]
    words = content_words(claim)
    return max(sentences, key=lambda s: len(words & content_words(s)))


def grounded_in(evidence: str) -> Callable[[str], float]:
    """The evidence check of a claim against a text (the context, the ground truth): its
    numbers and words in the text, a negation judged against the closest sentence."""

    def check(claim: str) -> float:
        support = evidence_support(claim, evidence)
        if negated(claim) != negated(best_evidence(claim, evidence)):
            support *= 0.5  # "is not free" against "is free": the words agree, the sense not
        return support

    return check


def answers(query: str) -> Callable[[str], float]:
    """The evidence check of relevance: the share of the query's content words that the
    claim takes up (an answer names what was asked about), at least a half when it states a
    number or a yes/no that a short answer may be all of."""

    def check(claim: str) -> float:
        wanted = content_words(query)
        if not wanted:
            return 0.5
        share = len(wanted & content_words(claim)) / len(wanted)
        return max(share, 0.5 if numbers(claim) else 0.0)

    return check


def model_weight(model: str) -> float:
    """The weight of a judge model's P(yes): DEFAULT_MODEL_WEIGHT for sorai's default model
    (its name, or a file or directory named after it), MODEL_WEIGHT for any other."""
    return DEFAULT_MODEL_WEIGHT if hub.DEFAULT_MODEL in str(model).lower() else MODEL_WEIGHT


def claim_verdicts(
    client: ChoiceJudge,
    prompt: Prompt,
    values: dict[str, Any],
    check: Callable[[str], float],
    weight: float | None = None,
) -> list[ClaimVerdict]:
    """One verdict per claim of values["response"]: the model's P(yes) to the prompt (which
    sees the claim as {{ claim }}) mixed with check(claim), P(yes) weighing `weight` (default:
    model_weight of the judge's model). At weight 0 the model is not asked: p_yes is NaN."""
    if weight is None:
        weight = model_weight(client.model)
    verdicts = []
    for claim in split_claims(str(values.get("response") or "")):
        messages = prompt.render(**values, claim=claim)
        evidence = check(claim)
        if weight:
            p_yes = client.choice_probabilities(messages, ["yes", "no"])["yes"]
            support = weight * p_yes + (1.0 - weight) * evidence
        else:
            p_yes, support = float("nan"), evidence
        verdicts.append(ClaimVerdict(claim, support, p_yes, evidence))
    return verdicts


def claim_score(
    client: ChoiceJudge, prompt: Prompt, values: dict[str, Any], check: Callable[[str], float]
) -> Verdict:
    """The 1-5 score 1 + 4 x mean support; the reason names the least supported claim."""
    verdicts = claim_verdicts(client, prompt, values, check)
    if not verdicts:
        return Verdict(1.0, "the response is empty")
    mean = sum(v.support for v in verdicts) / len(verdicts)
    weakest = min(verdicts, key=lambda v: v.support)
    held = sum(v.support >= 0.5 for v in verdicts)
    reason = f"{held} of {len(verdicts)} claims supported"
    if weakest.support < 0.5:
        reason += f"; least: {weakest.claim[:150]!r} (support {weakest.support:.2f})"
    return Verdict(round(1.0 + 4.0 * mean, 3), reason)
