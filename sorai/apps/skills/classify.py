"""classify: one label of a fixed set per text, with a confidence: from the labelled examples'
vote (classify_embed), from the label tokens' probabilities, or both (`method`).

The answer is decoded under a JSON schema whose `label` is an enum of the labels, so it is always
one of them. The confidence comes from the log-probabilities the endpoint reports at the label's
tokens (the model's own distribution, before the schema's mask): the probability mass of the
tokens that begin each label, normalised over the labels, followed down the next tokens where
labels share their first ones (see label_scores). An endpoint that reports no log-probabilities
gives confidence None.

With examples, method "auto" (the default) lets the examples vote (nearest neighbour and centroid
over encoder or character n-gram vectors, calibrated on the examples left out in turn): a 135M
model picking among twenty labels from a long few-shot prompt is at chance, the vote is not. The
model is asked too (the two distributions multiplied) only where the vote is weak: fewer than two
examples for some label and an unsure vote, or a vote that failed on its own examples.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sorai.apps.client import Client, parse_json_answer
from sorai.apps.skills.base import SkillError
from sorai.apps.skills.classify_embed import ExampleVote, fit

METHODS = ("auto", "llm", "embedding")
# auto asks the model too when a vote that could not be measured is less sure than this.
AUTO_ASK_BELOW = 0.5
# auto trusts the vote only when it labels at least this share of the examples left out in turn.
AUTO_MIN_LOO = 0.5

INSTRUCTION = "Classify the text into exactly one of the labels."


@dataclass
class Classification:
    text: str
    label: str
    confidence: float | None  # P(label) among the labels; None without log-probabilities
    scores: dict[str, float] = field(default_factory=dict)  # every label's probability
    method: str = "llm"  # what decided: "llm", "embedding" or "embedding+llm"


def _labels(labels: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    if not isinstance(labels, Mapping) and len(set(labels)) != len(labels):
        raise SkillError(f"duplicate labels in {list(labels)}")
    named = dict(labels) if isinstance(labels, Mapping) else {name: "" for name in labels}
    if len(named) < 2:
        raise SkillError("classify needs at least two labels")
    for name in named:
        if not isinstance(name, str) or not name.strip():
            raise SkillError(f"a label must be a non-empty string, got {name!r}")
    return named


def schema(labels: Sequence[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": list(labels)}},
        "required": ["label"],
        "additionalProperties": False,
    }


def messages(
    text: str,
    labels: Mapping[str, str],
    examples: Sequence[tuple[str, str]] = (),
    instruction: str = INSTRUCTION,
) -> list[dict[str, str]]:
    """The prompt: the instruction and the labels (with their descriptions), then each
    example as a user turn and its label as the answer, then the text."""
    lines = [instruction, "", "Labels:"]
    for name, description in labels.items():
        lines.append(f"- {name}" + (f": {description}" if description else ""))
    lines += ["", 'Answer with JSON: {"label": "<one of the labels>"}.']
    chat = [{"role": "system", "content": "\n".join(lines)}]
    for example, label in examples:
        if label not in labels:
            raise SkillError(f"example label {label!r} is not one of the labels {list(labels)}")
        chat.append({"role": "user", "content": example})
        chat.append({"role": "assistant", "content": f'{{"label": "{label}"}}'})
    chat.append({"role": "user", "content": text})
    return chat


def _raw(token: Any) -> bytes:
    """A logprobs entry's bytes (a byte-level token may be part of a character), or its text."""
    raw = getattr(token, "bytes", None)
    return bytes(raw) if raw is not None else token.token.encode("utf-8")


def _agrees(target: bytes, text: bytes) -> bool:
    """Whether `text` (label bytes generated so far) can be, or already is, `target` (a label
    as JSON writes it, closing quote included)."""
    return target.startswith(text) or text.startswith(target)


def label_scores(content: list[Any], answer: str, labels: Sequence[str]) -> dict[str, float] | None:
    """Each label's probability from the chat logprobs `content` of the JSON `answer`, matched
    on the tokens' bytes (Japanese labels start in the middle of a character's bytes).

    The probability is followed down the generated label's tokens for as long as more than one
    label agrees with them: labels that share a first token ("New York", "New Jersey") are told
    apart by the tokens after it, and a label that is a prefix of another ("New", "New York")
    by its closing quote. An alternative token leaving the generated path gives its mass to the
    labels it begins (evenly: what follows it was not generated, so it is not known), one that
    spells the same labels' beginning otherwise splits it as the generated path does."""
    head = answer[: answer.find('"', answer.find(":") + 1) + 1]  # up to the value's quote
    start = len(head.encode("utf-8"))
    if not head.endswith('"') or not content:
        return None
    offset = first = 0  # the token the label starts in, and where that token starts
    while offset + len(_raw(content[first])) <= start:
        offset += len(_raw(content[first]))
        first += 1
        if first == len(content):
            return None
    # Each label as the JSON answer spells it from its opening quote on: escapes, closing quote.
    encoded = {name: json.dumps(name, ensure_ascii=False)[1:].encode("utf-8") for name in labels}
    generated = b""  # the label's bytes generated so far
    steps: list[tuple[float, list[str], list[tuple[float, list[str]]]]] = []
    before = start - offset  # bytes of the first token that come before the label
    for token in content[first:]:
        chosen = _raw(token)
        prefix = chosen[:before]
        taken: tuple[float, list[str]] | None = None
        others: list[tuple[float, list[str]]] = []
        seen: set[bytes] = set()
        for alternative in [token, *token.top_logprobs]:
            raw = _raw(alternative)
            if raw in seen or raw[:before] != prefix or not raw[before:]:
                continue  # seen, not the same bytes before the label, or none of the label
            seen.add(raw)
            text = generated + raw[before:]
            agreeing = [name for name in labels if _agrees(encoded[name], text)]
            entry = (math.exp(alternative.logprob), agreeing)
            if raw == chosen:
                taken = entry
            else:
                others.append(entry)
        if taken is None:
            break
        steps.append((taken[0], taken[1], others))
        generated += chosen[before:]
        before = 0
        if len(taken[1]) <= 1:
            break
    if not steps or not steps[-1][1]:
        return None
    # From the last step back: P(label | the path up to this step).
    below: dict[str, float] | None = None
    for p_taken, agreeing, others in reversed(steps):
        if below is None:  # the tokens ran out while labels still agreed: no way to tell them
            below = {name: 1.0 / len(agreeing) for name in agreeing}
        mass = {name: p_taken * below.get(name, 0.0) for name in labels}
        for p, names in others:
            # Another spelling of the same prefix ("Ne" for "New") splits as the path taken
            # does further on; one that leaves it, evenly among the labels it begins.
            same = sum(below.get(name, 0.0) for name in names) if set(names) <= set(agreeing) else 0
            for name in names:
                mass[name] += p * below[name] / same if same > 0 else p / len(names)
        total = sum(mass.values())
        if total <= 0:
            return None
        below = {name: value / total for name, value in mass.items()}
    return below


def fit_vote(
    client: Client, labels: Sequence[str] | Mapping[str, str], examples: Sequence[tuple[str, str]]
) -> ExampleVote:
    """The examples' vote for `labels`, fitted once and reused across texts (the encoder's
    embeddings come from `client`)."""
    named = _labels(labels)
    for _, label in examples:
        if label not in named:
            raise SkillError(f"example label {label!r} is not one of the labels {list(named)}")

    def encode(texts: Sequence[str]) -> list[list[float]]:
        return client.embed(texts)

    return fit(named, examples, encode)


def _method(method: str) -> str:
    if method not in METHODS:
        raise SkillError(f"unknown classify method {method!r}: use one of {', '.join(METHODS)}")
    return method


def classify(
    client: Client,
    text: str,
    labels: Sequence[str] | Mapping[str, str],
    examples: Sequence[tuple[str, str]] = (),
    instruction: str = INSTRUCTION,
    method: str = "auto",
    vote: ExampleVote | None = None,
) -> Classification:
    """The label of `text` among `labels` (names, or names mapped to descriptions), following
    the few-shot `examples` ((text, label) pairs) when given. `method`: "llm" (the model's
    constrained answer), "embedding" (the examples' vote) or "auto" (the vote when the examples
    support it, with the model's probabilities when the vote is unsure). `vote` is a
    `fit_vote` result to reuse over many texts."""
    named = _labels(labels)
    _method(method)
    if not text.strip():
        raise SkillError("nothing to classify: the text is empty")
    if method == "llm" or (method == "auto" and not examples):
        return _llm(client, text, named, examples, instruction)
    vote = vote or fit_vote(client, named, examples)
    p_vote = vote.probabilities([text])[0]
    # Measured on the examples (two or more per label), the vote alone: the model's
    # distribution is overconfident (on the benchmark, ECE 0.49-0.86) and multiplying it in
    # lost calibration without gaining accuracy. Unmeasured, the model is asked where the vote
    # is unsure.
    measured = vote.loo_accuracy is not None
    if (
        method == "embedding"
        or (measured and vote.loo_accuracy >= AUTO_MIN_LOO)
        or (not measured and max(p_vote.values()) >= AUTO_ASK_BELOW)
    ):
        best = max(p_vote, key=p_vote.__getitem__)
        return Classification(text, best, p_vote[best], p_vote, "embedding")
    asked = _llm(client, text, named, examples, instruction)
    if not asked.scores:  # no log-probabilities: the model's label, the vote's confidence
        return Classification(text, asked.label, p_vote[asked.label], p_vote, "embedding+llm")
    product = {name: p_vote[name] * asked.scores[name] for name in named}
    total = sum(product.values())
    if total <= 0:
        return asked
    scores = {name: value / total for name, value in product.items()}
    best = max(scores, key=scores.__getitem__)
    return Classification(text, best, scores[best], scores, "embedding+llm")


def _llm(
    client: Client,
    text: str,
    named: dict[str, str],
    examples: Sequence[tuple[str, str]] = (),
    instruction: str = INSTRUCTION,
) -> Classification:
    """The model's label for `text`, decoded under the labels' schema, with the label tokens'
    probabilities."""
    response = client.chat(
        messages(text, named, examples, instruction),
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "classification",
                "schema": schema(list(named)),
                "strict": True,
            },
        },
        temperature=0,
        # A byte-level token is at least one byte: room for the longest label as JSON spells
        # it, whatever its script (a character count cut long Japanese labels short).
        max_tokens=32 + max(len(json.dumps(name, ensure_ascii=False).encode()) for name in named),
        logprobs=True,
        top_logprobs=20,
    )
    choice = response.choices[0]
    answer = choice.message.content or ""
    label = _parse_label(answer, named)
    content = choice.logprobs.content if choice.logprobs is not None else None
    scores = label_scores(content or [], answer, list(named)) if content else None
    confidence = scores[label] if scores else None
    return Classification(text, label, confidence, scores or {})


def _parse_label(answer: str, labels: Mapping[str, str]) -> str:
    """The label in the answer: the JSON asked for (bare, or in a fence or a sentence from an
    endpoint that ignores the schema), or just one of the labels, bare or quoted."""
    bare = answer.strip().strip("\"'`").strip()
    if bare in labels:
        return bare
    try:
        label = parse_json_answer(answer)["label"]
    except (ValueError, KeyError, TypeError):
        raise SkillError(f"the endpoint's answer is not a label: {answer[:200]!r}") from None
    if label not in labels:
        raise SkillError(f"the endpoint answered {label!r}, not one of {list(labels)}")
    return label


def classify_many(
    client: Client,
    texts: Sequence[str],
    labels: Sequence[str] | Mapping[str, str],
    examples: Sequence[tuple[str, str]] = (),
    instruction: str = INSTRUCTION,
    method: str = "auto",
) -> list[Classification]:
    """`classify` over `texts`, the examples' vote fitted once."""
    named = _labels(labels)
    fitted = method == "embedding" or (method == "auto" and examples)
    vote = fit_vote(client, named, examples) if _method(method) != "llm" and fitted else None
    return [classify(client, t, named, examples, instruction, method, vote) for t in texts]
