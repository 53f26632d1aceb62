"""summarize: a summary of any length of text, in a style and within a target length.

A text that fits the model's context window is summarized in one request. A longer one is
summarized map-reduce: split into chunks that fit (at paragraph, then sentence boundaries), each
chunk summarized to notes, the notes joined and summarized again (recursively, while they do not
fit), then written in the asked style. The length is a target in words (CJK characters count as
words); the summary is generated with a token budget from it and cut at a sentence end if it
still runs over.

A small model loops, ignores the style and invents figures, so every generation is guarded:
frequency and presence penalties against repeats, the bullets style decoded under a regex
(only `- ...` lines can come out), the output cut where it starts to repeat itself, every
sentence with a number its source does not hold dropped. A summary that fails its checks
(empty, a refusal, mostly words not in the source) gives way to the source's own key
sentences (`extractive` is then True); map-reduce notes are checked against their piece alike.
"""

from __future__ import annotations

import functools
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sorai.apps.client import Client
from sorai.apps.skills.base import SkillError
from sorai.apps.skills.summary_checks import (
    cut_loop,
    grounded_share,
    is_refusal,
    key_sentences,
    numbers,
    unsupported_numbers,
)
from sorai.apps.text import estimate_tokens, pack, sentences, truncate_words, word_count

STYLES = {
    "paragraph": "Write a concise summary as one paragraph.",
    "bullets": "Write the summary as a short list of bullet points, one per line, each "
    "starting with '- '.",
    "one-line": "Write the summary as one sentence.",
    "executive": "Write an executive summary: the conclusion first, then the key facts and "
    "decisions a manager needs, in plain language.",
}
NOTES = "Write the key facts, names, numbers and conclusions of this part as brief notes."
DEFAULT_CONTEXT = 4096
MAX_LEVELS = 4
MIN_NOTES = 48  # tokens of notes per piece, however many pieces
PROMPT_OVERHEAD = 200  # tokens of instructions and chat template around the text
# Penalties on the output's own tokens (not the source's, which a summary must reuse): enough
# to break "Q3 2026: Q3 2026: ..." on the default model without scrambling the wording.
GUARDS = {"frequency_penalty": 0.4, "presence_penalty": 0.2}
MAX_BULLETS = 8
BULLET_REGEX = rf"- [^\n]{{3,200}}(\n- [^\n]{{3,200}}){{0,{MAX_BULLETS - 1}}}"
MIN_WORDS = 4  # fewer is a fragment ("Q3 2026:" left of a loop), not a summary
MIN_GROUNDED = 0.5  # share of a summary's content words the source must hold


@dataclass
class Summary:
    text: str
    path: str  # "direct" (one request) or "map-reduce"
    chunks: int  # pieces the text was split into (1 when direct)
    levels: int  # rounds of summarizing summaries (0 when direct)
    words: int
    extractive: bool = False  # the source's own key sentences: generation failed its checks
    dropped: list[str] = field(default_factory=list)  # sentences cut for a number not in source


def split(text: str, budget: int) -> list[str]:
    """Pieces of `text` of at most `budget` estimated tokens, at paragraph boundaries, else at
    sentence boundaries, else at a hard cut."""
    units: list[str] = []
    for paragraph in (p for p in text.split("\n\n") if p.strip()):
        units += [paragraph] if estimate_tokens(paragraph) <= budget else sentences(paragraph)
    return pack(units, budget, lambda first, then: f"{first}\n\n{then}")


def _ask(client: Client, instruction: str, text: str, *, max_tokens: int, style: str = "") -> str:
    options: dict = dict(GUARDS)
    if style == "bullets":
        options["extra_body"] = {"guided_regex": BULLET_REGEX}
    response = client.chat(
        [
            {"role": "system", "content": instruction},
            {"role": "user", "content": text},
        ],
        max_tokens=max_tokens,
        temperature=0,
        **options,
    )
    return (response.choices[0].message.content or "").strip()


def claims(text: str, style: str) -> list[str]:
    """The claims of a summary: its `- ` lines for bullets, else its sentences."""
    if style == "bullets":
        # A small model under the bullet regex may still run items together on one line
        # ("- a. - b."): a " - " after a sentence end starts the next one.
        split = re.split(r"\n|(?<=[.!?。])\s+-\s+", text)
        return [line.strip() for line in split if line.strip()]
    return sentences(text)


def checked_summary(
    generated: str, source: str, style: str, max_words: int
) -> tuple[str, bool, list[str]]:
    """The summary to show for `generated` from `source`: cut where it loops, its claims with
    a number the source does not hold dropped; the source's key sentences instead when what is
    left is empty, a refusal or mostly foreign to the source. (text, extractive, dropped)."""
    text = cut_loop(generated)
    have = numbers(source)
    kept, dropped = [], []
    for claim in claims(text, style):
        if style == "bullets" and not claim.startswith("- "):
            claim = "- " + claim.lstrip("-*• ")
        (dropped if unsupported_numbers(claim, have) else kept).append(claim)
    if style == "one-line":
        kept = kept[:1]
    joined = ("\n" if style == "bullets" else " ").join(kept)
    if (
        word_count(joined) >= min(MIN_WORDS, max_words)
        and not is_refusal(joined)
        and grounded_share(joined, source) >= MIN_GROUNDED
    ):
        return _fit(joined, style, max_words), False, dropped
    return extractive(source, style, max_words), True, dropped


def extractive(source: str, style: str, max_words: int) -> str:
    """The source's own key sentences in `style` within `max_words`."""
    if style == "one-line":
        return key_sentences(source, max_words, limit=1)[0]
    picked = key_sentences(source, max_words - (MAX_BULLETS if style == "bullets" else 0))
    if style == "bullets":
        return "\n".join(f"- {s}" for s in picked[:MAX_BULLETS])
    return " ".join(picked)


def _fit(text: str, style: str, max_words: int) -> str:
    if style != "bullets":
        return truncate_words(text, max_words)
    kept: list[str] = []
    for line in text.splitlines():
        if word_count("\n".join(kept + [line])) > max_words:
            break
        kept.append(line)
    return "\n".join(kept) or truncate_words(text, max_words)


def summarize(
    client: Client,
    text: str,
    style: str = "paragraph",
    max_words: int = 120,
    context_tokens: int | None = None,
    concurrency: int = 8,
) -> Summary:
    """A summary of `text` in `style` (paragraph, bullets, one-line, executive) of at most
    `max_words` words. context_tokens: the model's window, default what the endpoint reports
    (max_model_len), else 4096. concurrency: map requests in flight at once."""
    if style not in STYLES:
        raise SkillError(f"unknown style {style!r}; styles: {', '.join(STYLES)}")
    if max_words < 1:
        raise SkillError(f"max_words must be at least 1, got {max_words}")
    if not text.strip():
        raise SkillError("nothing to summarize: the text is empty")
    context = context_tokens or client.context_length() or DEFAULT_CONTEXT
    answer_tokens = max_words * 2 + 16
    budget = context - PROMPT_OVERHEAD - answer_tokens
    if budget < 256:
        raise SkillError(
            f"a context window of {context} tokens leaves no room for text with a "
            f"{max_words}-word summary"
        )
    instruction = f"{STYLES[style]} Use at most {max_words} words."
    if estimate_tokens(text) <= budget:
        generated = _ask(client, instruction, text, max_tokens=answer_tokens, style=style)
        path, chunks, levels = "direct", 1, 0
    else:
        path, levels = "map-reduce", 0
        pieces = split(text, budget)
        chunks = len(pieces)
        while True:
            levels += 1
            # Notes sized so that, joined, they fit one request: one round usually does.
            notes_tokens = max(MIN_NOTES, min(answer_tokens * 2, int(0.8 * budget / len(pieces))))
            notes_prompt = f"{NOTES} Use at most {notes_tokens // 2} words."
            # The pieces go out together: the server batches them (continuous batching).
            with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
                ask = functools.partial(_ask, client, notes_prompt, max_tokens=notes_tokens)
                notes = list(pool.map(ask, pieces))
            # Notes that loop or invent figures would carry it into the summary: check each
            # against its piece, and note the piece's own key sentences where they fail.
            notes = [
                checked_summary(note, piece, "paragraph", notes_tokens // 2)[0]
                for note, piece in zip(notes, pieces, strict=True)
            ]
            joined = "\n\n".join(n for n in notes if n)
            if estimate_tokens(joined) <= budget or len(pieces) == 1:
                break
            if levels == MAX_LEVELS:
                # Notes that do not shrink (a model echoing its input): keep what fits.
                joined = split(joined, budget)[0]
                break
            pieces = split(joined, budget)
        generated = _ask(client, instruction, joined, max_tokens=answer_tokens, style=style)
    # Checked against the whole text: a number is fine when the source holds it.
    summary, fallback, dropped = checked_summary(generated, text, style, max_words)
    return Summary(summary, path, chunks, levels, word_count(summary), fallback, dropped)
