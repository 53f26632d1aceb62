"""summarize: a summary of any length of text, in a style and within a target length.

A text that fits the model's context window is summarized in one request. A longer one is
summarized map-reduce: split into chunks that fit (at paragraph, then sentence boundaries), each
chunk summarized to notes, the notes joined and summarized again (recursively, while they do not
fit), then written in the asked style. The length is a target in words (CJK characters count as
words); the summary is generated with a token budget from it and cut at a sentence end if it
still runs over.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sorai.apps.client import Client
from sorai.apps.skills.base import SkillError
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


@dataclass
class Summary:
    text: str
    path: str  # "direct" (one request) or "map-reduce"
    chunks: int  # pieces the text was split into (1 when direct)
    levels: int  # rounds of summarizing summaries (0 when direct)
    words: int


def split(text: str, budget: int) -> list[str]:
    """Pieces of `text` of at most `budget` estimated tokens, at paragraph boundaries, else at
    sentence boundaries, else at a hard cut."""
    units: list[str] = []
    for paragraph in (p for p in text.split("\n\n") if p.strip()):
        units += [paragraph] if estimate_tokens(paragraph) <= budget else sentences(paragraph)
    return pack(units, budget, lambda first, then: f"{first}\n\n{then}")


def _ask(client: Client, instruction: str, text: str, *, max_tokens: int) -> str:
    response = client.chat(
        [
            {"role": "system", "content": instruction},
            {"role": "user", "content": text},
        ],
        max_tokens=max_tokens,
        temperature=0,
    )
    return (response.choices[0].message.content or "").strip()


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
        summary = _ask(client, instruction, text, max_tokens=answer_tokens)
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
            joined = "\n\n".join(n for n in notes if n)
            if estimate_tokens(joined) <= budget or len(pieces) == 1:
                break
            if levels == MAX_LEVELS:
                # Notes that do not shrink (a model echoing its input): keep what fits.
                joined = split(joined, budget)[0]
                break
            pieces = split(joined, budget)
        summary = _ask(client, instruction, joined, max_tokens=answer_tokens)
    summary = truncate_words(summary, max_words)
    return Summary(summary, path, chunks, levels, word_count(summary))
