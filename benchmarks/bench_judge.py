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
from sorai.apps.eval.verdicts import (
    MODEL_WEIGHT,
    claim_verdicts,
    content_words,
    grounded_in,
    model_weight,
)

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
BEFORE = "fe24c1a"  # the commit whose ask decided found from the model's answer


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


def public_rows(seed: int = 0) -> list[dict]:
    """Groundedness rows from the public QA samples: a context of three sentences of a
    question's document around the one that holds its answer; grounded: that sentence;
    contradicted: the same sentence with its answer replaced by another question's answer of
    the same kind (a number for a number)."""
    from public_qa import holds, load

    from sorai.apps.text import sentences

    rng = random.Random(seed)
    docs, questions = load()
    rows, seen = [], set()
    for q in questions:
        for name in q.documents:
            lines = sentences(docs[name])
            at = next((i for i, s in enumerate(lines) if holds(s, q.answers)), None)
            if at is None or lines[at] in seen:
                continue
            seen.add(lines[at])
            sentence = lines[at]
            answer = next(a for a in q.answers if holds(sentence, (a,)))
            kind = answer.isdigit()
            pool = sorted(
                {a for o in questions for a in o.answers[:1] if a.isdigit() == kind}
                - set(q.answers)
            )
            wrong = rng.choice(pool) if pool else str(int(answer) + 1)
            changed = re.sub(re.escape(answer), wrong, sentence, count=1, flags=re.I)
            context = " ".join(lines[max(0, at - 1) : at + 2])
            rows.append({"context": context, "response": sentence, "label": 1, "kind": "grounded"})
            rows.append({"context": context, "response": changed, "label": 0, "kind": "swapped"})
            break
    return rows


def weight_sweep(claims: list[list[tuple[float, float]]], labels: list[int], seed: int = 0) -> None:
    """AUROC of the groundedness score for each weight of P(yes) against the evidence check,
    on a random half of the rows (train) and the other half (held out); the weight chosen on
    train (the smallest of the best) and its held-out AUROC."""
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    train, held = sorted(order[: len(order) // 2]), sorted(order[len(order) // 2 :])
    weights = [round(0.05 * i, 2) for i in range(21)]

    def area(rows: list[int], w: float) -> float:
        scores = [sum(w * p + (1 - w) * e for p, e in claims[i]) / len(claims[i]) for i in rows]
        return auroc(scores, [labels[i] for i in rows])

    table = [(w, area(train, w), area(held, w)) for w in weights]
    print(f"  weight of P(yes): AUROC train ({len(train)} rows) / held out ({len(held)} rows)")
    for w, a, b in table:
        print(f"    {w:.2f}: {a:.3f} / {b:.3f}")
    best = max(a for _, a, _ in table)
    w, a, b = next(t for t in table if t[1] == best)
    print(f"  chosen on train: weight {w:.2f} (train {a:.3f}), held out {b:.3f}")


def bench_judge(client: Client, name: str, rows: list[dict], rubric_rows: int) -> list:
    prompt = load_prompt("groundedness_claim")
    final, model, evidence, claims, t0 = [], [], [], [], time.perf_counter()
    weight = model_weight(client.model)  # the default's; P(yes) is asked for the sweep
    for row in rows:
        verdicts = claim_verdicts(client, prompt, row, grounded_in(row["context"]), MODEL_WEIGHT)
        final.append(
            sum(weight * v.p_yes + (1 - weight) * v.evidence for v in verdicts) / len(verdicts)
        )
        model.append(sum(v.p_yes for v in verdicts) / len(verdicts))
        evidence.append(sum(v.evidence for v in verdicts) / len(verdicts))
        claims.append([(v.p_yes, v.evidence) for v in verdicts])
    seconds = (time.perf_counter() - t0) / len(rows)
    labels = [r["label"] for r in rows]
    print(f"\ngroundedness, {name}: {len(rows)} rows ({sum(labels)} grounded), {seconds:.2f} s/row")
    print(f"  AUROC claim judge (default, weight {weight}): {auroc(final, labels):.3f}")
    print(f"  AUROC model part, P(yes):    {auroc(model, labels):.3f}")
    print(f"  AUROC evidence part:         {auroc(evidence, labels):.3f}")
    for kind in sorted({r["kind"] for r in rows} - {"grounded"}):
        keep = [i for i, r in enumerate(rows) if r["label"] or r["kind"] == kind]
        value = auroc([final[i] for i in keep], [labels[i] for i in keep])
        print(f"  AUROC grounded vs {kind:<12} {value:.3f}")
    weight_sweep(claims, labels)
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
    return claims


def cloze(sentence: str, rng: random.Random) -> tuple[str, str] | None:
    """A question made from a sentence by asking for one of its words: (question, word)."""
    words = [w for w in re.findall(r"[a-z]{6,}", sentence) if w in content_words(w)]
    if not words:
        return None
    word = rng.choice(words)
    return re.sub(rf"\b{word}\b", "what", sentence, count=1).rstrip(".") + "?", word


class CachedEmbedder:
    """The client with its embeddings kept by text: the ask benchmark indexes the same
    documents again and again."""

    def __init__(self, client: Client) -> None:
        self.client, self.memo = client, {}

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    def embed(self, texts: list[str]) -> list[list[float]]:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            self.memo.update(zip(todo, self.client.embed(todo), strict=True))
        return [self.memo[t] for t in texts]


def cloze_questions(count: int, seed: int = 1) -> list[dict]:
    """Cloze questions over indexes of 3 topics, the sentence's topic among them every other
    time; present: the sentence is in one of the index's documents (topics share sentences)."""
    rng = random.Random(seed)
    docs = corpus()
    names = list(docs)
    items = []
    for i in range(count):
        name, *others = rng.sample(names, 4)
        sentence = rng.choice(docs[name])
        made = cloze(sentence, rng)
        if made is None:
            continue
        chosen = ([name] if i % 2 == 0 else []) + others[: 2 if i % 2 == 0 else 3]
        texts = {n: " ".join(docs[n]) for n in chosen}
        present = any(sentence in t for t in texts.values())
        items.append({"question": made[0], "answers": [made[1]], "docs": texts, "present": present})
    return items


def public_questions(seed: int = 0) -> list[dict]:
    """Each public question twice: over its own documents and two others (present), and over
    three others that hold none of its (non-numeric) answers (absent)."""
    from public_qa import holds, load

    rng = random.Random(seed)
    docs, questions = load()
    items, seen = [], set()
    for q in questions:
        if q.question in seen:
            continue
        seen.add(q.question)
        words = tuple(a for a in q.answers if not a.isdigit())
        others = [n for n in docs if n not in q.documents and not (words and holds(docs[n], words))]
        for present in (True, False):
            chosen = list(q.documents) + rng.sample(others, 2) if present else rng.sample(others, 3)
            items.append(
                {
                    "question": q.question,
                    "answers": list(q.answers),
                    "docs": {n: docs[n] for n in chosen},
                    "present": present,
                    "source": q.source,
                }
            )
    return items


def _before_ask():
    """ask as it was before found came from the passages (commit BEFORE), for comparison."""
    import importlib.util
    import subprocess

    source = subprocess.run(
        ["git", "show", f"{BEFORE}:sorai/apps/skills/ask.py"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "ask_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("ask_before", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["ask_before"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.ask


def bench_ask(client: Client, name: str, items: list[dict], answers: int, before: bool) -> None:
    """found agreement with presence over every item (found is decided from the passages
    before the model is asked: `retrieve`), and the full ask, with the model's answer, on the
    first `answers` items."""
    from public_qa import holds

    from sorai.apps.rag import Index, add_files
    from sorai.apps.skills.ask import ask, retrieve

    old = _before_ask() if before else None
    embedder = CachedEmbedder(client)
    agree, wrong, asked, t0 = 0, [], [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, item in enumerate(items):
            folder = Path(tmp) / f"q{i}"
            folder.mkdir()
            for n, text in item["docs"].items():
                (folder / (n.replace("/", "__") + ".txt")).write_text(text, encoding="utf-8")
            with Index(Path(tmp) / f"q{i}.sqlite") as index:
                add_files(index, [folder], embedder)
                found = bool(retrieve(embedder, item["question"], index)[1])
                agree += found == item["present"]
                if found != item["present"]:
                    wrong.append((item["present"], item["question"]))
                if i < answers:
                    answer = ask(embedder, item["question"], index)
                    assert answer.found == found
                    flag = old(embedder, item["question"], index).found if old else None
                    right = answer.found and holds(answer.text, tuple(item["answers"]))
                    asked.append((item, answer, flag, right))
    seconds = (time.perf_counter() - t0) / len(items)
    n, present = len(items), sum(i["present"] for i in items)
    print(f"\nask, {name}: {n} questions ({present} with the answer in the index), {seconds:.1f} s")
    print(f"  found agrees with presence: {agree}/{n} = {agree / n:.1%}")
    for present, question in wrong:
        print(f"    wrong: present={present} found={not present} {question[:90]!r}")
    if asked:
        m = len(asked)
        same = sum(a.found == it["present"] for it, a, _, _ in asked)
        print(f"  full ask on the first {m}: found agrees {same}/{m}")
        if before:
            same = sum(f == it["present"] for it, _, f, _ in asked)
            print(f"  before ({BEFORE}, the answer's support decided): {same}/{m} = {same / m:.1%}")
        found = [(it, a, r) for it, a, _, r in asked if a.found]
        if found:
            extractive = sum(a.extractive for _, a, _ in found)
            right = sum(r for _, _, r in found)
            print(
                f"  of {len(found)} found: {extractive} extractive (the model's answer not backed),"
                f" {right} hold the labelled answer"
            )
        for it, a, _, _ in asked[:4]:
            print(f"    {it['question'][:60]!r} -> found={a.found} {a.text[:90]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--rubric-rows", type=int, default=12)
    parser.add_argument("--questions", type=int, default=200, help="cloze questions")
    parser.add_argument("--answers", type=int, default=10, help="full asks per set (the model)")
    parser.add_argument("--before", action="store_true", help=f"also run ask as of {BEFORE}")
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        print(f"cpu flags: {_cpu_flags()} | load average: {' '.join(f.read().split()[:3])}")
    print(f"python {sys.version.split()[0]}; data: pydoc_data.topics ({len(corpus())} topics)")
    with Client.local() as client:
        if args.rows:
            made = labelled_rows(args.rows)
            public = public_rows()
            a = bench_judge(client, "made from pydoc topics", made, args.rubric_rows)
            b = bench_judge(client, "public QA samples, answer swapped", public, 0)
            print("\ngroundedness, both sets together:")
            weight_sweep(a + b, [r["label"] for r in made + public])
        if args.questions:
            items = cloze_questions(args.questions)
            bench_ask(client, "cloze", items, args.answers, args.before)
            bench_ask(client, "public", public_questions(), args.answers, args.before)


if __name__ == "__main__":
    main()
