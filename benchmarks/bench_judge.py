"""The default judge's groundedness on a labelled set, and ask's `found` flag, on the default
model.

    python benchmarks/bench_judge.py [--rows 40] [--rubric-rows 12] [--questions 30]

Data: public text that ships with Python (the language reference's topics in
`pydoc_data.topics`, PSF licence); no public labelled groundedness or QA set could be had
from the registries this machine reaches. From it, labelled rows are made by rule: a context
(two to four sentences of one topic) with a grounded response (one of its sentences) or a bad
one (a sentence negated, a content word replaced by one from another topic, or a sentence of
another topic). Printed: AUROC of the claim judge's groundedness (the default now), of its
model part alone (P(yes)) and of its evidence part alone, per kind of bad answer, and of the
free 1-5 rubric judge of before on the first --rubric-rows rows. Then ask: cloze questions made
from one topic's sentence, asked over an index holding that topic (answer present) or not
(absent); `found` agreement with presence, before (the model's own flag) and after. Also
printed: CPU flags and the load average.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from pydoc_data.topics import topics

from sorai.apps.client import Client
from sorai.apps.eval.judge import judge, load_prompt
from sorai.apps.eval.verdicts import claim_verdicts, content_words, grounded_in

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _cpu_flags() -> str:
    with open("/proc/cpuinfo") as f:
        line = next((x for x in f if x.startswith("flags")), "")
    flags = {f for f in line.split() if f.startswith(("avx2", "avx512", "amx"))}
    return " ".join(sorted(flags)) or "(none of avx2/avx512/amx)"


def prose(text: str) -> list[str]:
    """A topic's prose sentences: paragraphs that are not headings, grammar or code."""
    sentences = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        if not lines or lines[0].startswith(" ") or set(lines[-1]) <= set("*=-~ "):
            continue
        paragraph = " ".join(line.strip() for line in lines)
        for s in _SENTENCE.split(paragraph):
            if 8 <= len(s.split()) <= 30 and s.endswith(".") and '"' not in s and "::" not in s:
                sentences.append(s)
    return sentences


def corpus() -> dict[str, list[str]]:
    found = {name: prose(text) for name, text in sorted(topics.items())}
    return {name: s for name, s in found.items() if len(s) >= 4}


def negate(sentence: str) -> str | None:
    for word, replacement in ((" is ", " is not "), (" are ", " are not "), (" can ", " cannot ")):
        if word in sentence:
            return sentence.replace(word, replacement, 1)
    return None


def swap_word(sentence: str, other: list[str], rng: random.Random) -> str | None:
    mine = [w for w in re.findall(r"[a-z]{5,}", sentence) if w in content_words(w)]
    theirs = sorted({w for s in other for w in re.findall(r"[a-z]{5,}", s)} - set(mine))
    if not mine or not theirs:
        return None
    return re.sub(rf"\b{rng.choice(mine)}\b", rng.choice(theirs), sentence, count=1)


def labelled_rows(count: int, seed: int = 0) -> list[dict]:
    """count rows, half grounded (label 1), half bad (label 0) of three kinds in turn."""
    rng = random.Random(seed)
    docs = corpus()
    names = list(docs)
    rows: list[dict] = []
    while len(rows) < count:
        name, other = rng.sample(names, 2)
        start = rng.randrange(0, len(docs[name]) - 3)
        context = docs[name][start : start + 3]
        chosen = rng.choice(context)
        kind = ["grounded", "negated", "swapped", "other topic"][len(rows) % 4 if rows else 0]
        if len(rows) % 2 == 0:
            kind = "grounded"
            response = chosen
        else:
            kind = ["negated", "swapped", "other topic"][(len(rows) // 2) % 3]
            if kind == "negated":
                response = negate(chosen)
            elif kind == "swapped":
                response = swap_word(chosen, docs[other], rng)
            else:
                response = rng.choice(docs[other])
        if response:
            rows.append(
                {
                    "context": " ".join(context),
                    "response": response,
                    "label": int(kind == "grounded"),
                    "kind": kind,
                }
            )
    return rows


def auroc(scores: list[float], labels: list[int]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    return sum(pairs) / len(pairs) if pairs else float("nan")


def bench_judge(client: Client, rows: list[dict], rubric_rows: int) -> None:
    prompt = load_prompt("groundedness_claim")
    final, model, evidence, t0 = [], [], [], time.perf_counter()
    for row in rows:
        verdicts = claim_verdicts(client, prompt, row, grounded_in(row["context"]))
        final.append(sum(v.support for v in verdicts) / len(verdicts))
        model.append(sum(v.p_yes for v in verdicts) / len(verdicts))
        evidence.append(sum(v.evidence for v in verdicts) / len(verdicts))
    seconds = (time.perf_counter() - t0) / len(rows)
    labels = [r["label"] for r in rows]
    print(f"\ngroundedness, {len(rows)} rows ({sum(labels)} grounded), {seconds:.2f} s/row")
    print(f"  AUROC claim judge (default): {auroc(final, labels):.3f}")
    print(f"  AUROC model part, P(yes):    {auroc(model, labels):.3f}")
    print(f"  AUROC evidence part:         {auroc(evidence, labels):.3f}")
    for kind in ("negated", "swapped", "other topic"):
        keep = [i for i, r in enumerate(rows) if r["label"] or r["kind"] == kind]
        value = auroc([final[i] for i in keep], [labels[i] for i in keep])
        print(f"  AUROC grounded vs {kind:<12} {value:.3f}")
    if rubric_rows:
        rubric, t0 = [], time.perf_counter()
        old = load_prompt("groundedness_no_query")
        for row in rows[:rubric_rows]:
            rubric.append(judge(client, old, row, max_tokens=200).score)
        seconds = (time.perf_counter() - t0) / rubric_rows
        print(
            f"  before: free 1-5 rubric on {rubric_rows} rows ({seconds:.1f} s/row): AUROC "
            f"{auroc(rubric, labels[:rubric_rows]):.3f}, scores {sorted(set(rubric))}; claim "
            f"judge on the same rows {auroc(final[:rubric_rows], labels[:rubric_rows]):.3f}"
        )


def cloze(sentence: str, rng: random.Random) -> tuple[str, str] | None:
    """A question made from a sentence by asking for one of its words: (question, word)."""
    words = [w for w in re.findall(r"[a-z]{6,}", sentence) if w in content_words(w)]
    if not words:
        return None
    word = rng.choice(words)
    return re.sub(rf"\b{word}\b", "what", sentence, count=1).rstrip(".") + "?", word


def bench_ask(client: Client, count: int, seed: int = 1) -> None:
    from sorai.apps.rag import Index, add_files
    from sorai.apps.skills.ask import ask

    rng = random.Random(seed)
    docs = corpus()
    names = list(docs)
    agree_after = agree_before = 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            name, *others = rng.sample(names, 4)
            sentence = rng.choice(docs[name])
            made = cloze(sentence, rng)
            if made is None:
                continue
            question, _ = made
            present = i % 2 == 0
            chosen = ([name] if present else []) + others[: 3 if not present else 2]
            folder = Path(tmp) / f"q{i}"
            folder.mkdir()
            for n in chosen:
                (folder / f"{n}.txt").write_text(" ".join(docs[n]), encoding="utf-8")
            index = Index(Path(tmp) / f"q{i}.sqlite")
            add_files(index, [folder], client)
            answer = ask(client, question, index)
            before = bool(answer.model_found)  # None: no passage relevant, the model not asked
            agree_after += answer.found == present
            agree_before += before == present
            results.append((present, answer.found, before, question, answer.text[:80]))
    n = len(results)
    print(f"\nask found agreement over {n} questions ({sum(r[0] for r in results)} answerable)")
    print(
        f"  after (from evidence): {agree_after / n:.0%}   before (model's flag): "
        f"{agree_before / n:.0%}"
    )
    for present, found, before, question, text in results[:6]:
        print(f"  present={present} found={found} model={before} {question[:60]!r} -> {text!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--rubric-rows", type=int, default=12)
    parser.add_argument("--questions", type=int, default=30)
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        print(f"cpu flags: {_cpu_flags()} | load average: {' '.join(f.read().split()[:3])}")
    print(f"python {sys.version.split()[0]}; data: pydoc_data.topics ({len(corpus())} topics)")
    with Client.local() as client:
        bench_judge(client, labelled_rows(args.rows), args.rubric_rows)
        if args.questions:
            bench_ask(client, args.questions)


if __name__ == "__main__":
    main()
