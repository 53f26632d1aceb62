"""classify's accuracy and calibration on the default model: the LLM-only method of before
(`--method llm`) against the examples' vote (`embedding`) and `auto`, on public labelled sets.

Data: chatterbot-corpus (PyPI, BSD-3), pulled once into ~/.cache/sorai/bench: its English
conversations in 21 topic categories (every utterance labelled with its file's category), and
three Japanese categories (スポーツ, 科学, お金). Per class, `--shots` examples (default 10) are
given and up to `--per-class` others are classified. Prints accuracy and expected calibration
error (ECE, 10 bins) per method, the vote's chosen representation and temperature, CPU flags
and load.

    PYTHONPATH=$PWD python benchmarks/bench_classify.py [--per-class 3] [--sets en,ja]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path

BENCH = Path.home() / ".cache" / "sorai" / "bench"
CORPUS = BENCH / "chatterbot-corpus"
JA_LABELS = ["スポーツ", "科学", "お金"]


def corpus() -> Path:
    """The unpacked chatterbot-corpus wheel, downloaded with pip the first time."""
    data = CORPUS / "chatterbot_corpus" / "data"
    if not data.is_dir():
        CORPUS.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "chatterbot-corpus==1.3.3"]
            + ["-d", str(CORPUS)],
            check=True,
        )
        (wheel,) = glob.glob(str(CORPUS / "*.whl"))
        zipfile.ZipFile(wheel).extractall(CORPUS)
    return data


def load(language: str) -> dict[str, list[str]]:
    """Category -> its distinct utterances (stripped, 3 characters or more)."""
    import yaml

    classes: dict[str, list[str]] = {}
    for path in sorted((corpus() / language).glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        name = data["categories"][-1] if language == "japanese" else path.stem
        seen: dict[str, None] = {}
        for conversation in data.get("conversations") or []:
            for line in conversation:
                if isinstance(line, str) and len(line.strip()) >= 3:
                    seen.setdefault(" ".join(line.split()), None)
        classes[name] = list(seen)
    return classes


def split(
    classes: dict[str, list[str]], shots: int, per_class: int, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    rng = random.Random(seed)
    examples, tests = [], []
    for name, texts in classes.items():
        texts = texts[:]
        rng.shuffle(texts)
        examples += [(t, name) for t in texts[:shots]]
        tests += [(t, name) for t in texts[shots : shots + per_class]]
    rng.shuffle(tests)
    return examples, tests


def cpu() -> str:
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = sorted(f for f in flags if f == "avx2" or f.startswith(("avx512", "amx")))
    return f"cpu flags: {' '.join(wanted)}; cores {os.cpu_count()}; load {os.getloadavg()}"


def main() -> None:
    from sorai.apps.client import Client
    from sorai.apps.skills.classify import classify, fit_vote
    from sorai.apps.skills.classify_embed import expected_calibration_error

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=3)
    parser.add_argument("--sets", default="en,ja")
    parser.add_argument("--methods", default="llm,embedding,auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args()
    print(cpu(), flush=True)
    figures: dict[str, dict] = {}
    with Client.local() as client:
        for which in args.sets.split(","):
            if which == "en":
                classes = load("english")
                per_class = args.per_class
            else:
                every = load("japanese")
                classes = {name: every[name] for name in JA_LABELS}
                per_class = max(args.per_class, 10)
            classes = {k: v for k, v in classes.items() if len(v) > args.shots}
            examples, tests = split(classes, args.shots, per_class, args.seed)
            labels = list(classes)
            instruction = "Classify the text into the topic of its category."
            print(
                f"\n[{which}] {len(labels)} classes, {len(examples)} examples, {len(tests)} texts",
                flush=True,
            )
            started = time.perf_counter()
            vote = fit_vote(client, labels, examples)
            print(
                f"  vote: feature {vote.feature}, temperature {vote.temperature:.3f}, "
                f"leave-one-out accuracy {vote.loo_accuracy:.3f} "
                f"({time.perf_counter() - started:.1f} s)",
                flush=True,
            )
            for method in args.methods.split(","):
                started = time.perf_counter()
                right, confidences, used = [], [], {}
                for done, (text, truth) in enumerate(tests):
                    if done and done % 20 == 0:
                        print(f"    {method}: {done}/{len(tests)}", flush=True)
                    r = classify(client, text, labels, examples, instruction, method, vote)
                    right.append(r.label == truth)
                    confidences.append(r.confidence if r.confidence is not None else 0.0)
                    used[r.method] = used.get(r.method, 0) + 1
                accuracy = sum(right) / len(right)
                ece = expected_calibration_error(confidences, right)
                seconds = time.perf_counter() - started
                figures[f"{which}/{method}"] = {
                    "accuracy": accuracy,
                    "ece": ece,
                    "n": len(tests),
                    "classes": len(labels),
                    "decided_by": used,
                    "seconds": seconds,
                }
                print(
                    f"  {method:9s} accuracy {accuracy:.3f}  ECE {ece:.3f}  "
                    f"decided by {used}  ({seconds:.0f} s)",
                    flush=True,
                )
            if "llm" in args.methods:
                for method in args.methods.split(","):
                    if method != "llm":
                        gain = (
                            figures[f"{which}/{method}"]["accuracy"]
                            - figures[f"{which}/llm"]["accuracy"]
                        )
                        print(f"  {method} - llm: {100 * gain:+.1f} points")
    print(cpu())
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
