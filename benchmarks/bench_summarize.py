"""summarize and topics on the default model, before (today's plain generation and model-only
topic names) vs after (guarded decoding, number checks, extractive fallback; keyword labels
with checked names), on public data: ACLSum (PyPI `aclsum`, ACL papers with reference
summaries written by annotators).

    python benchmarks/bench_summarize.py [--articles 50] [--styles paragraph,bullets,one-line]
        [--workers 4] [--topics] [--url http://127.0.0.1:8000]

Articles: each paper's introduction and conclusion; reference: its challenge, approach and
outcome summaries joined. Reported per style and method: loops (a run of 4 words said twice),
summaries with a number the article does not hold, bullets style obeyed, ROUGE-L F1 (LCS over
lowercased words) against the reference, the extractive fallback's share, median seconds.
--workers: articles summarized at once (the engine batches them; seconds are then per summary
under that concurrency). --topics: topic names over 5 corpora of ACLSum texts (the
challenge, approach and outcome summaries, titles, abstracts' first sentences): names empty
or a refusal, before vs after.
The sdist is fetched once with pip into ~/.cache/sorai/bench/aclsum.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sorai.apps.client import Client
from sorai.apps.skills import summarize as summarize_module
from sorai.apps.skills.summary_checks import has_loop, is_refusal, numbers
from sorai.apps.text import truncate_words
from sorai.model.hardware import machine

CACHE = Path.home() / ".cache" / "sorai" / "bench" / "aclsum"
PACKAGE = "aclsum==0.1.2"
_WORD = re.compile(r"\w+")


def dataset() -> Path:
    """ACLSum's data folder, fetched with pip (the sdist carries the jsonl files)."""
    root = CACHE / "aclsum-0.1.2" / "src" / "aclsum" / "dataset"
    if not (root / "test.jsonl").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             PACKAGE, "-d", str(CACHE)],
            check=True,
        )  # fmt: skip
        with tarfile.open(CACHE / "aclsum-0.1.2.tar.gz") as archive:
            archive.extractall(CACHE, filter="data")
    return root


def articles(count: int) -> list[tuple[str, str]]:
    rows = []
    root = dataset()
    for split in ("test", "val", "train"):
        for line in (root / f"{split}.jsonl").read_text().splitlines():
            doc = json.loads(line)
            text = " ".join(doc["sentences"]["introduction"] + doc["sentences"]["conclusion"])
            reference = " ".join(doc["summary"][a] for a in ("challenge", "approach", "outcome"))
            rows.append((text, reference))
    return rows[:count]


def rouge_l(candidate: str, reference: str) -> float:
    a = [w.lower() for w in _WORD.findall(candidate)]
    b = [w.lower() for w in _WORD.findall(reference)]
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(previous[j] + 1 if x == y else max(previous[j + 1], row[j]))
        previous = row
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def before(client: Client, text: str, style: str, max_words: int) -> str:
    """Today's method: the style's instruction, greedy, no guard or check."""
    instruction = f"{summarize_module.STYLES[style]} Use at most {max_words} words."
    response = client.chat(
        [{"role": "system", "content": instruction}, {"role": "user", "content": text}],
        max_tokens=max_words * 2 + 16,
        temperature=0,
    )
    return truncate_words((response.choices[0].message.content or "").strip(), max_words)


def after(client: Client, text: str, style: str, max_words: int) -> tuple[str, bool]:
    summary = summarize_module.summarize(client, text, style, max_words)
    return summary.text, summary.extractive


def bullets_ok(text: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip()]
    return bool(lines) and all(line.startswith("- ") for line in lines)


def summarize_article(client: Client, n: int, text: str, style: str, max_words: int) -> dict:
    """Both methods on one article: {method: (summary, fallback, seconds)}."""
    out = {}
    # Interleaved, so that a load change on a shared machine hits both alike.
    for method in ("before", "after") if n % 2 == 0 else ("after", "before"):
        start = time.perf_counter()
        if method == "before":
            summary, fallback = before(client, text, style, max_words), False
        else:
            summary, fallback = after(client, text, style, max_words)
        out[method] = (summary, fallback, time.perf_counter() - start)
    return out


def bench_summaries(
    client: Client, count: int, styles: list[str], max_words: int, workers: int = 1
) -> dict:
    rows = articles(count)
    report = {}
    for style in styles:
        stats = {m: {"loops": 0, "bad_numbers": 0, "style_ok": 0, "rouge": [], "seconds": [],
                     "fallback": 0} for m in ("before", "after")}  # fmt: skip
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = [
                pool.submit(summarize_article, client, n, text, style, max_words)
                for n, (text, _) in enumerate(rows)
            ]
            for n, ((text, reference), future) in enumerate(zip(rows, futures, strict=True)):
                have = numbers(text)
                for method, (out, fallback, seconds) in future.result().items():
                    s = stats[method]
                    s["seconds"].append(seconds)
                    s["loops"] += has_loop(out)
                    s["bad_numbers"] += any(x not in have for x in numbers(out))
                    ok = bullets_ok(out) if style == "bullets" else "\n" not in out.strip()
                    s["style_ok"] += ok
                    s["rouge"].append(rouge_l(out, reference))
                    s["fallback"] += fallback
                print(f"  {style} {n + 1}/{len(rows)}", file=sys.stderr, flush=True)
        report[style] = {
            m: {
                "articles": len(rows),
                "loops": s["loops"],
                "summaries_with_a_number_not_in_source": s["bad_numbers"],
                "style_obeyed": s["style_ok"],
                "rouge_l_f1": round(statistics.mean(s["rouge"]), 4),
                "extractive_fallbacks": s["fallback"],
                "median_s": round(statistics.median(s["seconds"]), 2),
            }
            for m, s in stats.items()
        }
        print(json.dumps({style: report[style]}), flush=True)
    return report


def corpora() -> dict[str, list[str]]:
    root = dataset()
    docs = [json.loads(line) for s in ("test", "val", "train")
            for line in (root / f"{s}.jsonl").read_text().splitlines()]  # fmt: skip
    out = {a: [d["summary"][a] for d in docs] for a in ("challenge", "approach", "outcome")}
    titles = []
    for path in sorted((root / "paper_jsons").glob("*.json"))[:200]:
        title = json.loads(path.read_text()).get("title")
        if title:
            titles.append(title)
    out["titles"] = titles
    out["abstract_openings"] = [
        d["sentences"]["abstract"][0] for d in docs if d["sentences"]["abstract"]
    ]
    return out


def bench_topics(client: Client, k: int) -> dict:
    from sorai.apps.skills import topics as topics_module

    report = {}
    for name, texts in corpora().items():
        found = topics_module.topics(client, texts, k=k)
        models = [topics_module._label(client, t.examples) for t in found]  # before: as shown
        report[name] = {
            "texts": len(texts),
            "topics": len(found),
            "before_refusal_or_empty": sum(is_refusal(m) or not m.strip() for m in models),
            "after_refusal_or_empty": sum(
                is_refusal(t.label) or not t.label.strip() for t in found
            ),
            "before_failing_the_name_checks": sum(
                not topics_module.is_name(m, [texts[i] for i in t.members])
                for m, t in zip(models, found, strict=True)
            ),
            "after_named_by_model": sum(t.named for t in found),
            "labels": [t.label for t in found],
            "before_labels": models,
        }
        print(json.dumps({name: report[name]}, ensure_ascii=False), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=50)
    parser.add_argument("--styles", default="paragraph,bullets,one-line")
    parser.add_argument("--max-words", type=int, default=60)
    parser.add_argument("--topics", action="store_true", help="also topic names (5 corpora)")
    parser.add_argument("--topics-only", action="store_true")
    parser.add_argument("--k", type=int, default=6, help="topics per corpus")
    parser.add_argument("--workers", type=int, default=1, help="articles at once")
    parser.add_argument("--url", default=None)
    args = parser.parse_args()
    print(json.dumps({"machine": machine().describe(), "loadavg": os.getloadavg()}), flush=True)
    client = Client.connect(args.url) if args.url else Client.local()
    result = {}
    try:
        if not args.topics_only:
            styles = [s for s in args.styles.split(",") if s]
            result["summaries"] = bench_summaries(
                client, args.articles, styles, args.max_words, args.workers
            )
        if args.topics or args.topics_only:
            result["topics"] = bench_topics(client, args.k)
    finally:
        client.close()
    result["loadavg_end"] = os.getloadavg()
    print(json.dumps(result, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
